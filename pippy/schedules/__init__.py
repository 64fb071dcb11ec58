"""Pipeline schedules as data: IR, generators, validation, lowering and CSV."""

from pippy.schedules.generators import (
    SCHEDULES,
    dualpipev,
    forward_only,
    gpipe,
    interleaved_1f1b,
    looped_bfs,
    make_schedule,
    one_f_one_b,
    zb_h1,
    zb_h2,
    zbv,
)
from pippy.schedules.ir import Action, Kind, Schedule, as_actions, chain_deps, loop_placement, v_placement
from pippy.schedules.lower import from_csv, from_csv_string, lower, to_csv, to_csv_string
from pippy.schedules.render_grid import grid
from pippy.schedules.validate import ScheduleError, deadlock_free, unit_time_starts, validate

__all__ = [
    "SCHEDULES",
    "Action",
    "Kind",
    "Schedule",
    "ScheduleError",
    "as_actions",
    "chain_deps",
    "deadlock_free",
    "dualpipev",
    "forward_only",
    "from_csv",
    "from_csv_string",
    "gpipe",
    "grid",
    "interleaved_1f1b",
    "loop_placement",
    "looped_bfs",
    "lower",
    "make_schedule",
    "one_f_one_b",
    "to_csv",
    "to_csv_string",
    "unit_time_starts",
    "v_placement",
    "validate",
    "zb_h1",
    "zb_h2",
    "zbv",
]

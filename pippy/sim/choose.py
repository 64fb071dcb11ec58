"""Cost-driven choice among generated schedules: simulate each as the runtime runs it, keep the fastest.

Generators (:mod:`pippy.schedules`) are pure; where a schedule has variants whose speed depends on
the hardware (ZB-V's two orders), the choice lives here, one layer up, next to the simulator.
Each candidate is judged by :func:`~pippy.schedules.lower.runtime_form` of it (gradless backward
deferred, adjacent I+W fused), which is what the runtime executes.

    >>> from pippy.schedules.zero_bubble import zbv
    >>> fastest([zbv(2, 8, "split"), zbv(2, 8, "whole")]) == zbv(2, 8, "whole")
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pippy.schedules.generators import make_schedule
from pippy.schedules.ir import Schedule
from pippy.schedules.lower import runtime_form
from pippy.schedules.zero_bubble import ZBV_ORDERS, zbv
from pippy.sim.compact import compact_w
from pippy.sim.cost import CostModel, StageCost
from pippy.sim.reorder import reorder_where_faster
from pippy.sim.simulate import simulate
from pippy.sim.unfuse import split_where_faster

__all__ = ["default_costs", "fastest", "fastest_form", "fit_costs", "make_schedule_for", "zbv_for_costs"]


def default_costs(num_stages: int) -> CostModel:
    """The costs a choice assumes when none are given: F = I = W = 1 and a whole backward B = 1.5.

    On this project's CPU runtime a split backward costs 10-35% more than a whole one (GPT-2
    block: I + W 46 ms, B 34 ms); B = 1.5 < I + W = 2 reflects that. Pass measured costs
    (:mod:`pippy.sim.profile`) to decide for your hardware.

        >>> c = default_costs(2)
        >>> c.num_stages, c.stages[0].b, c.stages[0].i + c.stages[0].w
        (2, 1.5, 2.0)
    """
    if num_stages < 1:
        raise ValueError(f"default_costs: expected num_stages >= 1, got {num_stages}; pass the schedule's stage count")
    return CostModel(stages=[StageCost(f=1.0, i=1.0, w=1.0, fused_b=1.5) for _ in range(num_stages)])


def fit_costs(costs: CostModel | None, num_stages: int) -> CostModel:
    """``costs`` for ``num_stages`` stages (rebinned when they differ); :func:`default_costs` for ``None``.

        >>> fit_costs(None, 3).num_stages, fit_costs(default_costs(2), 4).num_stages
        (3, 4)
    """
    if costs is None:
        return default_costs(num_stages)
    return costs if costs.num_stages == num_stages else costs.rebin(num_stages)


def fastest(
    candidates: Sequence[Schedule], costs: CostModel | None = None, *, gradless_stages: Iterable[int] = (0,),
    compact: bool = False,
) -> Schedule:
    """The candidate whose runtime form simulates fastest under ``costs`` (the first on ties).

    Each candidate is simulated as :func:`~pippy.schedules.lower.runtime_form` ``(candidate,
    gradless_stages)``, with ``costs`` rebinned to its stage count (``None``:
    :func:`default_costs`), and with ``compact`` after :func:`~pippy.sim.compact.compact_w` (as
    the runtime runs a generated schedule). Returns the candidate itself, as generated.

        >>> from pippy.schedules.generators import gpipe, one_f_one_b
        >>> fastest([gpipe(2, 4), one_f_one_b(2, 4)]).name  # same step time: the first wins
        'gpipe'
    """
    if not candidates:
        raise ValueError("fastest: expected at least one candidate schedule, got none; pass e.g. [zbv(p, m, 'whole')]")
    gradless = tuple(gradless_stages)
    best, best_time = candidates[0], float("inf")
    for cand in candidates:
        cm = fit_costs(costs, cand.num_stages)
        form = runtime_form(cand, gradless)
        t = simulate(compact_w(form, cm) if compact else form, cm).step_time
        if t < best_time:
            best, best_time = cand, t
    return best


def fastest_form(schedule: Schedule, costs: CostModel | None = None, *,
                 gradless_stages: Iterable[int] = (0,), compact: bool = False,
                 mixed: bool = False) -> tuple[Schedule, bool]:
    """The runtime form of ``schedule`` that simulates faster: I+W fused into B (True) or kept split (False).

    Fusing pays when a whole backward costs less than I + W (``fused_b``, e.g. 34 ms vs 46 ms for a
    GPT-2 block on this CPU); when it costs the same (unit costs: B = I + W) it only delays the input
    gradient and pins W where the fused B is, so the split form is faster. Ties go to fusing (the
    runtime's default, ``fuse_backward=True``). Returns ``(form, fused)``. With ``compact`` both
    forms are judged, and returned, after :func:`~pippy.sim.compact.compact_w` (W's moved into the
    gaps they fit, as the runtime does). With ``mixed`` (implies ``compact``; what
    ``fuse_backward="auto"`` runs) a fused form that won is refined, for a split-backward schedule
    (one with I actions: ZB-H1/H2, ZB-V, ...), by splitting again the B's whose earlier input
    gradient shortens the step (:func:`~pippy.sim.unfuse.split_where_faster`); ``fused`` is then
    still True, although ``fuse_backward=True`` alone would run the unrefined form. With ``mixed``
    a split-backward schedule's form, fused or split, then has actions moved earlier on their rank
    where that shortens the step at no more memory (:func:`~pippy.sim.reorder.reorder_where_faster`).

        >>> from pippy.schedules.zero_bubble import zbv
        >>> from pippy.sim.cost import CostModel
        >>> fastest_form(zbv(2, 8, "whole"), CostModel.uniform(4))[1], fastest_form(zbv(2, 8, "whole"))[1]
        (False, True)
    """
    gradless = tuple(gradless_stages)
    cm = fit_costs(costs, schedule.num_stages)
    fused, split = runtime_form(schedule, gradless), runtime_form(schedule, gradless, fuse=False)
    if compact or mixed:
        fused, split = compact_w(fused, cm), compact_w(split, cm)
    refine = mixed and schedule.uses_split_backward()  # a schedule without I's (1F1B, ...) stays what it is
    if simulate(split, cm).step_time < simulate(fused, cm).step_time - 1e-12:
        return (reorder_where_faster(split, cm) if refine else split), False
    if refine:
        fused = reorder_where_faster(split_where_faster(fused, cm, gradless_stages=gradless), cm)
    return fused, True


def zbv_for_costs(
    p: int, m: int, costs: CostModel | None = None, *, gradless_stages: Iterable[int] = (0,), compact: bool = True
) -> Schedule:
    """ZB-V in the order (``"whole"`` or ``"split"``, see :func:`~pippy.schedules.zero_bubble.zbv`) that runs faster.

    :func:`fastest` of the two orders, ``"whole"`` first (it wins ties), each judged after
    :func:`~pippy.sim.compact.compact_w` (``compact``, default; the runtime compacts). Under
    :func:`default_costs` *split* wins only for few micro-batches (``2 <= m <= p`` or a little
    more, e.g. m = 2..5 for p = 4) and *whole* everywhere else.

        >>> from pippy.schedules.zero_bubble import zbv
        >>> zbv_for_costs(2, 8) == zbv(2, 8, "whole"), zbv_for_costs(4, 2) == zbv(4, 2, "split")
        (True, True)
    """
    return fastest([zbv(p, m, order) for order in ZBV_ORDERS], costs, gradless_stages=gradless_stages,
                   compact=compact)


def make_schedule_for(
    name: str,
    p: int,
    m: int,
    costs: CostModel | None = None,
    *,
    gradless_stages: Iterable[int] = (0,),
    **options: Any,
) -> Schedule:
    """The schedule registered as ``name``, with any cost-dependent variant chosen for ``costs``.

    Like :func:`pippy.schedules.generators.make_schedule` (same names and ``options``), except
    ``"zbv"`` without options, which goes through :func:`zbv_for_costs` (``costs=None``: the
    :func:`default_costs`, as the runtime's ``ScheduleZBV`` does). Other schedules have no
    variants; ``costs`` does not change them.

        >>> make_schedule_for("1f1b", 2, 4).name
        '1f1b'
        >>> make_schedule_for("zbv", 4, 2) == zbv_for_costs(4, 2)
        True
    """
    if name.strip().lower().replace("-", "_") == "zbv" and not options:
        return zbv_for_costs(p, m, costs, gradless_stages=gradless_stages)
    return make_schedule(name, p, m, **options)

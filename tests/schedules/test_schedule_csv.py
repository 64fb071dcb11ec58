"""CSV and compact-string round trips, and loading hand-written compute-only CSVs."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pippy.schedules import (
    SCHEDULES,
    Action,
    Schedule,
    forward_only,
    from_csv,
    from_csv_string,
    lower,
    make_schedule,
    to_csv,
    to_csv_string,
    v_placement,
    validate,
)


def same(a: Schedule, b: Schedule) -> None:
    assert (a.name, a.actions, a.stage_to_rank, a.n_microbatches, a.deps) == (
        b.name, b.actions, b.stage_to_rank, b.n_microbatches, b.deps
    )


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_action_strings_round_trip(name: str) -> None:
    for s in (make_schedule(name, 3, 6), lower(make_schedule(name, 3, 6))):
        for acts in s.actions:
            assert [Action.parse(str(a)) for a in acts] == acts


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_csv_round_trip(name: str) -> None:
    s = make_schedule(name, 3, 6)
    same(from_csv_string(to_csv_string(s)), s)
    lo = lower(s)
    back = from_csv_string(to_csv_string(lo))
    same(back, lo)
    validate(back)


def test_csv_keeps_skip_deps_and_empty_rank(tmp_path: Path) -> None:
    s = make_schedule("1f1b", 4, 3).with_deps({0: (), 1: (0,), 2: (0, 1), 3: (2,)})
    path = tmp_path / "sched.csv"
    to_csv(lower(s), path)
    back = from_csv(path)
    same(back, lower(s))
    assert "# deps: 1<0 2<0 2<1 3<2" in path.read_text()
    empty = forward_only((0, 2), 2)
    same(from_csv_string(to_csv_string(empty)), empty)


def test_csv_file_objects() -> None:
    s = make_schedule("zbv", 2, 4)
    buf = io.StringIO()
    to_csv(s, buf)
    buf.seek(0)
    same(from_csv(buf), s)


def test_hand_written_compute_only_csv(tmp_path: Path) -> None:
    text = "0F0,0F1,3F0,3I0,3W0,3F1,3I1,3W1,0I0,0W0,0I1,0W1\n1F0,2F0,1F1,2I0,2F1,2I1,1I0,1I1,2W0,2W1,1W0,1W1,,\n"
    path = tmp_path / "my_v.csv"
    path.write_text(text)
    s = from_csv(path)
    assert s.name == "my_v"
    assert s.stage_to_rank == v_placement(2)
    assert s.n_microbatches == 2
    validate(s)
    validate(lower(s))


def test_overrides_and_errors() -> None:
    s = from_csv_string("0F0,0B0\n1F0,1B0\n", name="x", n_microbatches=1, stage_to_rank=(0, 1))
    assert s.name == "x"
    with pytest.raises(ValueError, match="stage 0 has actions on ranks 0 and 1"):
        from_csv_string("0F0\n0B0\n")
    with pytest.raises(ValueError, match=r"stages \[1\] never appear"):
        from_csv_string("0F0,0B0,2F0,2B0\n")
    with pytest.raises(ValueError, match=r"CSV row 2 \(rank 1\): cannot parse action 'oops'"):
        from_csv_string("0F0,0B0\noops\n")
    with pytest.raises(ValueError, match="consumer<producer"):
        from_csv_string("# deps: 1-0\n0F0\n")

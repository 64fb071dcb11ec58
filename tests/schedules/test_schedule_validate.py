"""The validator rejects each kind of broken schedule and marks the offending cell in its grid."""

from __future__ import annotations

import pytest

from pippy.schedules import (
    Action,
    Kind,
    Schedule,
    ScheduleError,
    as_actions,
    deadlock_free,
    grid,
    lower,
    one_f_one_b,
    validate,
    zb_h1,
)


def sched(*rows: str, placement: tuple[int, ...] | None = None, m: int | None = None,
          deps: dict[int, tuple[int, ...]] | None = None) -> Schedule:
    acts = [as_actions(r.split()) for r in rows]
    if placement is None:
        placement = tuple(range(len(rows)))
    if m is None:
        m = 1 + max(a.mb for r in acts for a in r)
    return Schedule("t", acts, placement, m, deps or {})


def reject(s: Schedule, *, match: str, cells: list[tuple[int, int]]) -> ScheduleError:
    with pytest.raises(ScheduleError, match=match) as info:
        validate(s)
    err = info.value
    assert sorted(err.cells) == sorted(cells)
    text = str(err)
    assert "expected:" in text and "fix:" in text
    for r, t in cells:
        assert f"[{s.actions[r][t]}]" in text if t < len(s.actions[r]) else "[?]" in text
    assert not deadlock_free(s)
    return err


def test_good_schedules_pass() -> None:
    validate(one_f_one_b(2, 2))
    validate(lower(zb_h1(3, 5)))
    assert deadlock_free(sched("0F0 0B0", "1F0 1B0"))


def test_missing_backward() -> None:
    s = sched("0F0 0F1 0B0", "1F0 1B0 1F1 1B1")
    err = reject(s, match=r"0B1 missing", cells=[(0, 1)])
    assert "add 0B1 to rank 0" in str(err)


def test_missing_forward() -> None:
    reject(sched("0F0 0B0 0B1", "1F0 1B0 1F1 1B1"), match=r"0F1 is missing", cells=[(0, 2)])


def test_missing_weight_grad() -> None:
    reject(sched("0F0 0I0", "1F0 1I0 1W0"), match=r"0W0 missing", cells=[(0, 0), (0, 1)])


def test_duplicate() -> None:
    err = reject(sched("0F0 0F0 0B0", "1F0 1B0"), match="appears twice", cells=[(0, 0), (0, 1)])
    assert "delete one" in str(err)


def test_wrong_rank() -> None:
    err = reject(sched("0F0 0B0 1F0", "1B0"), match="stage 1 lives on rank 1", cells=[(0, 2)])
    assert "move 1F0 to rank 1" in str(err)


def test_out_of_range() -> None:
    reject(sched("0F0 0B0 0F5", "1F0 1B0", m=1), match="out of range", cells=[(0, 2)])


def test_b_mixed_with_i_w() -> None:
    reject(sched("0F0 0B0 0I0 0W0", "1F0 1B0"), match="both a full backward B and a split", cells=[(0, 0), (0, 1), (0, 2), (0, 3)])


def test_order_violation_same_rank() -> None:
    err = reject(sched("0B0 0F0", "1F0 1B0"), match=r"0B0 needs 0F0 first", cells=[(0, 0), (0, 1)])
    assert "move 0F0 before step 0" in str(err)


def test_w_before_i() -> None:
    reject(sched("0F0 0W0 0I0", "1F0 1I0 1W0"), match=r"0W0 needs 0I0 first", cells=[(0, 1), (0, 2)])


def test_order_violation_between_local_stages() -> None:
    # stages 0 and 1 on one rank: 1F0 needs 0F0, which comes later
    s = sched("1F0 0F0 1B0 0B0", placement=(0, 0))
    reject(s, match=r"1F0 needs 0F0 first", cells=[(0, 0), (0, 1)])


def test_deadlock_compute_only() -> None:
    # rank 0 waits for 1B0 before sending 0F1; rank 1 runs mb 1 first
    s = sched("0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0")
    err = reject(s, match="deadlock", cells=[(0, 1), (1, 0)])
    assert "1F1 waits for 0F1 (rank 0 step 2)" in str(err)


def test_deadlock_lowered() -> None:
    s = lower(sched("0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"))
    err = reject(s, match="deadlock", cells=[(0, 2), (1, 0)])
    assert "1RECV_F1 waits for 0SEND_F1" in str(err)


def test_deadlock_v_placement_forward() -> None:
    # V on 2 ranks: rank 0 holds 0 and 3; running 3F0 first can never finish
    s = sched("3F0 0F0", "1F0 2F0", placement=(0, 1, 1, 0))
    s.actions = [as_actions(["3F0", "0F0", "3B0", "0B0"]), as_actions(["1F0", "2F0", "2B0", "1B0"])]
    reject(s, match="deadlock", cells=[(0, 0), (1, 0)])


def test_lowered_missing_recv() -> None:
    s = lower(one_f_one_b(2, 1))
    s.actions[1] = [a for a in s.actions[1] if a.kind is not Kind.RECV_F]
    reject(s, match=r"1RECV_F0 is missing", cells=[(1, 0)])


def test_lowered_extra_send() -> None:
    s = lower(one_f_one_b(2, 1))
    s.actions[1].insert(1, Action(1, Kind.SEND_F, 0))  # stage 1 has no consumer
    reject(s, match="1SEND_F0 is not needed", cells=[(1, 1)])


def test_lowered_recv_after_compute() -> None:
    s = lower(one_f_one_b(2, 1))
    row = s.actions[1]
    row[0], row[1] = row[1], row[0]  # 1F0 before 1RECV_F0
    reject(s, match=r"1F0 needs 1RECV_F0 first", cells=[(1, 0), (1, 1)])


def test_skip_edge_deps_are_honoured() -> None:
    deps = {0: (), 1: (0,), 2: (0, 1)}
    # stage 2 consumes stage 0 directly: its backward must come before 0B0
    ok = sched("0F0 1F0 2F0 2B0 1B0 0B0", placement=(0, 0, 0), deps=deps)
    validate(ok)
    bad = sched("0F0 1F0 2F0 1B0 0B0 2B0", placement=(0, 0, 0), deps=deps)
    reject(bad, match=r"1B0 needs 2B0 first", cells=[(0, 3), (0, 5)])


def test_bad_deps_and_placement() -> None:
    with pytest.raises(ScheduleError, match=r"deps\[1\]=\(2,\)"):
        validate(sched("0F0 0B0", "1F0 1B0", "2F0 2B0", deps={0: (), 1: (2,), 2: ()}))
    with pytest.raises(ScheduleError, match=r"stage_to_rank\[1\]=5"):
        validate(sched("0F0 0B0", placement=(0, 5)))


def test_grid_window_and_marks() -> None:
    s = one_f_one_b(2, 30)
    text = grid(s, mark=(0, 40), window=2)
    assert "[0B19]" in text and "…" in text
    assert grid(s).count("\n") == 2
    assert "[?]" in grid(one_f_one_b(1, 1), mark=[(0, 2)])

"""Lowering inserts exactly the SEND/RECV the executor expects, for chains, V placement and skip edges."""

from __future__ import annotations

import pytest

from pippy.schedules import (
    SCHEDULES,
    Kind,
    Schedule,
    as_actions,
    gpipe,
    lower,
    make_schedule,
    one_f_one_b,
    validate,
    zbv,
)

SKIP_DEPS = {0: (), 1: (0,), 2: (0, 1), 3: (2,)}


def row(s: Schedule, r: int) -> list[str]:
    return [str(a) for a in s.actions[r]]


def test_lower_1f1b_positions() -> None:
    s = lower(one_f_one_b(2, 2))
    assert row(s, 0) == ["0F0", "0SEND_F0", "0F1", "0SEND_F1", "0RECV_B0", "0B0", "0RECV_B1", "0B1"]
    assert row(s, 1) == [
        "1RECV_F0", "1F0", "1B0", "1SEND_B0", "1RECV_F1", "1F1", "1B1", "1SEND_B1",
    ]


def test_lower_split_backward_sends_after_i() -> None:
    s = lower(make_schedule("zb_h1", 2, 1))
    assert row(s, 0) == ["0F0", "0SEND_F0", "0RECV_B0", "0I0", "0W0"]
    assert row(s, 1) == ["1RECV_F0", "1F0", "1I0", "1SEND_B0", "1W0"]


def test_no_comm_between_stages_on_one_rank() -> None:
    s = lower(zbv(2, 1))  # rank 1 holds stages 1 and 2: 1 -> 2 stays local
    assert row(s, 1) == ["1RECV_F0", "1F0", "2F0", "2SEND_F0", "2RECV_B0", "2I0", "1I0", "1SEND_B0", "2W0", "1W0"]
    assert not any(a.kind.is_comm for a in lower(gpipe(1, 3)).actions[0])


def test_lower_twice_is_noop() -> None:
    once = lower(one_f_one_b(3, 4))
    twice = lower(once)
    assert twice.actions == once.actions and twice is not once
    assert lower(once.compute_only()).actions == once.actions


def test_lower_keeps_metadata() -> None:
    s = make_schedule("interleaved_1f1b", 2, 4).with_deps(SKIP_DEPS)
    lo = lower(s)
    assert (lo.name, lo.stage_to_rank, lo.n_microbatches, lo.deps) == (s.name, s.stage_to_rank, 4, s.deps)
    assert lo.compute_only().actions == s.actions


def test_skip_edges_one_send_many_receivers() -> None:
    s = lower(one_f_one_b(4, 1).with_deps(SKIP_DEPS))
    validate(s)
    assert row(s, 0) == ["0F0", "0SEND_F0", "0RECV_B0", "0B0"]  # one send reaches stages 1 and 2
    assert row(s, 2) == ["2RECV_F0", "2F0", "2SEND_F0", "2RECV_B0", "2B0", "2SEND_B0"]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_generator_lowers_with_skip_deps(name: str) -> None:
    for p, m in [(2, 4), (4, 8)]:
        s = make_schedule(name, p, m)
        if s.num_stages < 4:
            continue
        deps = dict(SKIP_DEPS)
        deps.update({t: (t - 1,) for t in range(4, s.num_stages)})
        validate(lower(s.with_deps(deps)))


def test_lowered_action_counts() -> None:
    s = lower(one_f_one_b(3, 5))
    kinds = [a.kind for acts in s.actions for a in acts]
    assert kinds.count(Kind.SEND_F) == kinds.count(Kind.RECV_F) == 2 * 5
    assert kinds.count(Kind.SEND_B) == kinds.count(Kind.RECV_B) == 2 * 5


def test_hand_written_compute_only_lowers() -> None:
    s = Schedule("hand", [as_actions("0F0 0F1 0B0 0B1".split()), as_actions("1F0 1B0 1F1 1B1".split())], (0, 1), 2)
    validate(lower(s))


def test_fuse_adjacent_iw_keeps_validity_and_counts() -> None:
    from pippy.schedules.generators import make_schedule
    from pippy.schedules.ir import Kind
    from pippy.schedules.lower import fuse_adjacent_iw
    from pippy.schedules.validate import validate

    for name in ("zb_h1", "zb_h2", "zbv", "dualpipev"):
        sch = make_schedule(name, 3, 6)
        fused = fuse_adjacent_iw(sch)
        validate(fused)
        validate(lower(fused))
        for before, after in zip(sch.actions, fused.actions):
            n_b = sum(a.kind is Kind.B for a in after)
            assert len(after) == len(before) - n_b  # each B replaced one I and one W
            assert sum(a.kind is Kind.F for a in after) == sum(a.kind is Kind.F for a in before)
    assert any(a.kind is Kind.B for r in fuse_adjacent_iw(make_schedule("dualpipev", 2, 8)).actions for a in r)


@pytest.mark.parametrize(("name", "p", "m"), [("zbv", 2, 4), ("zbv", 3, 7), ("zb_h1", 4, 5), ("dualpipev", 2, 4)])
def test_defer_gradless_backward_stays_valid(name: str, p: int, m: int) -> None:
    from pippy.schedules.lower import defer_gradless_backward

    base = make_schedule(name, p, m)
    s = defer_gradless_backward(base, [0])
    validate(s)
    validate(lower(s))
    row = s.actions[s.stage_to_rank[0]]
    assert [a.mb for a in row if a.stage == 0 and a.kind is Kind.B] == list(range(m))
    assert not any(a.stage == 0 and a.kind in (Kind.I, Kind.W) for a in row)
    # B sits where W was: same position among the rank's other actions
    old = [str(a) for a in base.actions[s.stage_to_rank[0]] if not (a.stage == 0 and a.kind is Kind.I)]
    assert [x.replace("B", "W") if x.startswith("0") else x for x in map(str, row)] == old

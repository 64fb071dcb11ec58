"""The one dependency rule (ir.needs) and what is derived from it: stage_comm, comm_around, lower, validate."""

from __future__ import annotations

import pytest

from pippy.schedules import (
    SCHEDULES,
    Action,
    Done,
    Kind,
    Need,
    Schedule,
    as_actions,
    comm_around,
    forward_only,
    loop_placement,
    lower,
    make_schedule,
    need_table,
    needs,
    stage_comm,
    v_placement,
    validate,
)

# stages 0, 1 on rank 0, stage 2 on rank 1, stage 3 on rank 0; 2 reads 0 (skip edge) and 1; 3 reads 2
SKIP = Schedule("skip", [[], []], (0, 0, 1, 0), 1, {0: (), 1: (0,), 2: (0, 1), 3: (2,)})


def test_done_slots_and_kind_done() -> None:
    assert [int(d) for d in Done] == [0, 1, 2, 3, 4]
    assert {k: k.done for k in Kind} == {
        Kind.F: Done.F, Kind.B: Done.G, Kind.I: Done.G, Kind.W: Done.W,
        Kind.SEND_F: Done.SEND_F, Kind.SEND_B: Done.SEND_B, Kind.RECV_F: None, Kind.RECV_B: None,
    }


def test_rule_compute_only() -> None:
    assert needs(SKIP, 0, Kind.F, lowered=False) == ()
    assert needs(SKIP, 1, Kind.F, lowered=False) == (Need(0, Done.F, False),)
    assert needs(SKIP, 2, Kind.F, lowered=False) == (Need(0, Done.F, True), Need(1, Done.F, True))
    for k in (Kind.B, Kind.I):
        assert needs(SKIP, 0, k, lowered=False) == (Need(0, Done.F, False), Need(1, Done.G, False), Need(2, Done.G, True))
        assert needs(SKIP, 3, k, lowered=False) == (Need(3, Done.F, False),)
    assert needs(SKIP, 2, Kind.W, lowered=False) == (Need(2, Done.G, False),)


def test_rule_lowered() -> None:
    assert needs(SKIP, 2, Kind.F, lowered=True) == (
        Need(0, Done.SEND_F, True, Kind.RECV_F), Need(1, Done.SEND_F, True, Kind.RECV_F),
    )
    assert needs(SKIP, 3, Kind.F, lowered=True) == (Need(2, Done.SEND_F, True, Kind.RECV_F),)
    assert needs(SKIP, 2, Kind.B, lowered=True) == (Need(2, Done.F, False), Need(3, Done.SEND_B, True, Kind.RECV_B))
    assert needs(SKIP, 1, Kind.I, lowered=True) == (Need(1, Done.F, False), Need(2, Done.SEND_B, True, Kind.RECV_B))
    assert needs(SKIP, 2, Kind.SEND_F, lowered=True) == (Need(2, Done.F, False),)
    assert needs(SKIP, 2, Kind.SEND_B, lowered=True) == (Need(2, Done.G, False),)
    assert needs(SKIP, 2, Kind.RECV_F, lowered=True) == (Need(0, Done.SEND_F, True), Need(1, Done.SEND_F, True))
    assert needs(SKIP, 2, Kind.RECV_B, lowered=True) == (Need(3, Done.SEND_B, True),)
    assert needs(SKIP, 1, Kind.RECV_B, lowered=True) == (Need(2, Done.SEND_B, True),)
    assert needs(SKIP, 1, Kind.RECV_F, lowered=True) == ()  # its producer is on the same rank


def test_needs_bad_stage() -> None:
    with pytest.raises(ValueError, match=r"stage 4 is out of range .*expected 0\.\.3"):
        needs(SKIP, 4, Kind.F, lowered=False)


@pytest.mark.parametrize("lowered", [False, True])
def test_need_table_is_needs(lowered: bool) -> None:
    for sch in (SKIP, make_schedule("zbv", 3, 4), make_schedule("interleaved_1f1b", 2, 4)):
        table = need_table(sch, lowered=lowered)
        assert set(table) == set(Kind)
        for k in Kind:
            assert table[k] == tuple(needs(sch, s, k, lowered=lowered) for s in range(sch.num_stages))


def _comm_in(lowered: Schedule) -> dict[int, set[Kind]]:
    out: dict[int, set[Kind]] = {s: set() for s in range(lowered.num_stages)}
    for acts in lowered.actions:
        for a in acts:
            if a.kind.is_comm:
                out[a.stage].add(a.kind)
    return out


CASES = [
    *(make_schedule(name, 3, 5) for name in SCHEDULES),
    make_schedule("interleaved_1f1b", 2, 4).with_deps({0: (), 1: (0,), 2: (0, 1), 3: (1, 2)}),
    make_schedule("zbv", 2, 4).with_deps({0: (), 1: (0,), 2: (0, 1), 3: (2,)}),
    forward_only(v_placement(3), 2),
    forward_only(loop_placement(2, 2), 2, {0: (), 1: (0,), 2: (0, 1), 3: (2,)}),
]


@pytest.mark.parametrize("sch", CASES, ids=lambda s: f"{s.name}-{s.num_stages}")
def test_stage_comm_is_what_lower_inserts(sch: Schedule) -> None:
    comm = stage_comm(sch)
    assert {s: set(v) for s, v in comm.items()} == _comm_in(lower(sch))
    place, cons = sch.stage_to_rank, sch.consumers()
    trains = sch.uses_split_backward() or any(a.kind is Kind.B for r in sch.actions for a in r)
    for s in range(sch.num_stages):
        remote_prod = any(place[d] != place[s] for d in sch.deps.get(s, ()))
        remote_cons = any(place[c] != place[s] for c in cons[s])
        assert (Kind.RECV_F in comm[s]) == remote_prod and (Kind.SEND_F in comm[s]) == remote_cons
        assert (Kind.RECV_B in comm[s]) == (remote_cons and trains)
        assert (Kind.SEND_B in comm[s]) == (remote_prod and trains)


@pytest.mark.parametrize("sch", CASES, ids=lambda s: f"{s.name}-{s.num_stages}")
def test_comm_around_places_every_comm_action(sch: Schedule) -> None:
    around = comm_around(sch)
    for acts in lower(sch).actions:
        for t, a in enumerate(acts):
            if a.kind.is_compute:
                before, after = around[(a.stage, a.kind)]
                assert [x.kind for x in acts[t - len(before):t]] == list(before)
                assert [x.kind for x in acts[t + 1:t + 1 + len(after)]] == list(after)
                assert all(x.stage == a.stage and x.mb == a.mb for x in acts[t - len(before):t + 1 + len(after)])
    for (s, k), (before, after) in around.items():
        assert set(before) | set(after) <= stage_comm(sch)[s]
        if k is Kind.W:
            assert before == after == ()


def test_comm_around_directions() -> None:
    sch = Schedule("t", [as_actions(["0F0", "0I0", "0W0"]), as_actions(["1F0", "1B0"])], (0, 1), 1)
    around = comm_around(sch)
    assert around[(0, Kind.F)] == ((), (Kind.SEND_F,))
    assert around[(0, Kind.I)] == around[(0, Kind.B)] == ((Kind.RECV_B,), ())
    assert around[(1, Kind.F)] == ((Kind.RECV_F,), ())
    assert around[(1, Kind.B)] == ((), (Kind.SEND_B,))


def test_lowered_validate_needs_the_recv_first() -> None:
    s = lower(Schedule("t", [as_actions(["0F0", "0B0"]), as_actions(["1F0", "1B0"])], (0, 1), 1))
    row = s.actions[1]
    assert [str(a) for a in row] == ["1RECV_F0", "1F0", "1B0", "1SEND_B0"]
    row[0], row[1] = row[1], row[0]
    with pytest.raises(ValueError, match=r"1F0 needs 1RECV_F0 first"):
        validate(s)
    assert Action(1, Kind.RECV_F, 0) in row

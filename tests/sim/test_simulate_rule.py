"""The simulator reads the dependency rule from pippy.schedules.ir.needs; engines signal with typed exceptions."""

from __future__ import annotations

import random

import pytest

from pippy.schedules.generators import make_schedule
from pippy.schedules.ir import Done, Kind, Schedule, as_actions, need_table
from pippy.schedules.lower import lower
from pippy.schedules.validate import deadlock_free
from pippy.sim._fastsim import Misfit, NeedsLowered, Stuck, Template, run_numpy
from pippy.sim.cost import CostModel, StageCost
from pippy.sim.simulate import DeadlockError, _static, _templates, simulate

# stages 0, 1 on rank 0, stage 2 on rank 1; 2 reads 1 and, by a skip edge, 0
SKIP = Schedule("skip", [as_actions(["0F0", "1F0", "1B0", "0B0"]), as_actions(["2F0", "2B0"])], (0, 0, 1), 1,
                {0: (), 1: (0,), 2: (0, 1)})
COSTS = CostModel(
    stages=[StageCost(f=1, send_bytes=50, grad_bytes=20), StageCost(f=2, send_bytes=10, grad_bytes=30), StageCost(f=3)],
    latency=0.5, bandwidth=10.0,
)


def _key(stage: int, slot: Done, m: int = 1) -> int:
    return (stage * len(Done) + slot) * m


@pytest.mark.parametrize("lowered", [False, True])
def test_templates_follow_needs(lowered: bool) -> None:
    sch = lower(SKIP) if lowered else SKIP
    table = _templates(sch, COSTS, lowered)
    rule = need_table(sch, lowered=lowered)
    assert set(table) == {k.value for k in Kind if lowered or k.is_compute}
    for name, rows in table.items():
        kind = Kind(name)
        for s, tp in enumerate(rows):
            assert isinstance(tp, Template) and tp.rank == sch.stage_to_rank[s]
            assert [kb for kb, _ in tp.deps] == [_key(n.stage, n.done) for n in rule[kind][s]]
            assert tp.own == (-1 if kind.done is None else _key(s, kind.done))
            assert (tp.duration < 0) == (kind in (Kind.RECV_F, Kind.RECV_B))


@pytest.mark.parametrize("lowered", [False, True])
def test_transfer_delays(lowered: bool) -> None:
    table = _templates(lower(SKIP) if lowered else SKIP, COSTS, lowered)
    fwd = "RECV_F" if lowered else "F"
    # forward edges carry the producer's send_bytes: 0 -> 2 is 0.5 + 50/10, 1 -> 2 is 0.5 + 10/10
    assert [d for _, d in table[fwd][2].deps] == [5.5, 1.5]
    # gradient edges carry the waiting stage's grad_out_bytes: stage 1 waits for 2's gradient, 3 s
    bwd = "RECV_B" if lowered else "B"
    assert [d for _, d in table[bwd][1].deps][-1] == 3.5
    assert [d for _, d in table[bwd][0].deps][-1] == 2.5
    assert table["B"][1].deps[0] == (_key(1, Done.F), 0.0)  # own forward: same rank, no delay


def test_numpy_engine_signals_with_typed_exceptions() -> None:
    c = CostModel.uniform(2)
    bad = Schedule("w", [as_actions(["1F0"]), as_actions(["0F0"])], (0, 1), 1)
    with pytest.raises(Misfit) as mis:
        run_numpy(bad, _templates(bad, c, False), _static(bad, c))
    assert (mis.value.rank, mis.value.pos, mis.value.duplicate) == (0, 0, False)
    twice = Schedule("t", [as_actions(["0F0", "0F0"])], (0,), 1)
    with pytest.raises(Misfit) as mis:
        run_numpy(twice, _templates(twice, CostModel.uniform(1), False), [0.0])
    assert (mis.value.rank, mis.value.pos, mis.value.duplicate) == (0, 1, True)
    stuck = Schedule("bad", [as_actions(["0F0", "0B0"]), as_actions(["1B0", "1F0"])], (0, 1), 1)
    with pytest.raises(Stuck) as st:
        run_numpy(stuck, _templates(stuck, c, False), _static(stuck, c))
    assert st.value.ptr == [1, 0] and st.value.waiting[1] == _key(1, Done.F)
    low = lower(make_schedule("1f1b", 2, 2))
    with pytest.raises(NeedsLowered):
        run_numpy(low, _templates(low, c, False), _static(low, c))
    assert max(run_numpy(low, _templates(low, c, True), _static(low, c))["free"]) == 3 * (2 + 2 - 1)


def _swap_some(sch: Schedule, rng: random.Random) -> Schedule:
    acts = [list(r) for r in sch.actions]
    for _ in range(2):
        r = rng.randrange(len(acts))
        if len(acts[r]) > 1:
            i = rng.randrange(len(acts[r]) - 1)
            acts[r][i], acts[r][i + 1] = acts[r][i + 1], acts[r][i]
    return Schedule(sch.name, acts, sch.stage_to_rank, sch.n_microbatches, dict(sch.deps))


def test_validator_and_simulator_agree_on_deadlock() -> None:
    """Both read the same rule: a reordered compute-only schedule runs in one iff it passes the other."""
    rng = random.Random(7)
    bases = [make_schedule(n, 3, 4) for n in ("1f1b", "zb_h1", "zbv", "interleaved_1f1b")]
    bases.append(make_schedule("zbv", 2, 3).with_deps({0: (), 1: (0,), 2: (0, 1), 3: (1, 2)}))
    seen = set()
    for base in bases:
        for _ in range(40):
            sch = _swap_some(base, rng)
            ok = deadlock_free(sch)
            for engine in ("python", "numpy"):
                try:
                    simulate(sch, CostModel.uniform(sch.num_stages), engine=engine)
                    runs = True
                except DeadlockError:
                    runs = False
                assert runs == ok, (engine, str(sch))
            seen.add(ok)
    assert seen == {True, False}

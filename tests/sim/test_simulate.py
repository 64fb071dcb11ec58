"""Simulator: closed forms, hand-checked costs, memory conventions, errors, both engines agree."""

import random

import pytest

from pippy.schedules.generators import SCHEDULES, gpipe, interleaved_1f1b, make_schedule, one_f_one_b, zb_h1
from pippy.schedules.ir import Schedule, as_actions
from pippy.schedules.lower import lower
from pippy.sim.cost import CostModel, StageCost
from pippy.sim.simulate import DeadlockError, simulate

ENGINES = ["python", "numpy"]

# Unit-cost convention: F = I = W = 1 per rank, so B = 2. A rank holding v stages runs each at 1/v.


def _unit(sch: Schedule) -> CostModel:
    v = sch.num_stages / sch.num_ranks
    return CostModel.uniform(sch.num_stages, f=1 / v, i=1 / v, w=1 / v)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 16])
def test_gpipe_and_1f1b_closed_form(p: int, m: int) -> None:
    for gen in (gpipe, one_f_one_b):
        r = simulate(gen(p, m), _unit(gen(p, m)))
        assert r.step_time == pytest.approx(3 * (m + p - 1))
        for b in r.bubble:
            assert b == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 8), (4, 16), (8, 16), (3, 9)])
def test_interleaved_closed_form(p: int, m: int) -> None:
    v = 2
    sch = interleaved_1f1b(p, m, v)
    r = simulate(sch, _unit(sch))
    for b in r.bubble:
        assert b == pytest.approx((p - 1) / (v * m + p - 1))


@pytest.mark.parametrize(("p", "m"), [(2, 2), (2, 4), (4, 4), (4, 8), (4, 16), (8, 8), (8, 24)])
def test_zb_h1_closed_form(p: int, m: int) -> None:
    # Qi et al. 2024: ZB-H1 idles (p-1)(T_F + T_B - T_W) per rank; with T_F=T_B=T_W=1 that is
    # p-1, a third of 1F1B's (p-1)(T_F+T_B+T_W); step = 3m + p - 1.
    r = simulate(zb_h1(p, m), _unit(zb_h1(p, m)))
    assert r.step_time == pytest.approx(3 * m + p - 1)
    for b in r.bubble:
        assert b == pytest.approx((p - 1) / (3 * m + p - 1))


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("engine", ENGINES)
def test_lowered_equals_compute_only(name: str, engine: str) -> None:
    sch = make_schedule(name, 4, 8)
    c = CostModel.uniform(sch.num_stages, f=1.3, i=0.7, w=0.4, send_bytes=100, latency=0.1, bandwidth=1000)
    a, b = simulate(sch, c, engine=engine), simulate(lower(sch), c, engine=engine)
    assert a.step_time == pytest.approx(b.step_time)
    assert a.peak_memory == pytest.approx(b.peak_memory)


def _two_rank_1f1b() -> Schedule:
    return Schedule("hand", [as_actions(["0F0", "0F1", "0B0", "0B1"]), as_actions(["1F0", "1B0", "1F1", "1B1"])], (0, 1), 2)


def _hand_costs() -> CostModel:
    # transfer = 0.5 + 10 / 10 = 1.5 s both ways
    return CostModel(
        stages=[StageCost(f=1, i=1, w=1, act_bytes=5, send_bytes=10, static_bytes=100),
                StageCost(f=2, i=2, w=1, act_bytes=7)],
        latency=0.5, bandwidth=10.0,
    )


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("lowered", [False, True])
def test_hand_checked_latency_case(engine: str, lowered: bool) -> None:
    # r1: F0 [2.5,4.5] B0 [4.5,7.5] F1 [7.5,9.5] (arrived 3.5) B1 [9.5,12.5]
    # r0: F0 [0,1] F1 [1,2] B0 [9,11] (7.5+1.5) B1 [14,16] (12.5+1.5)
    sch = _two_rank_1f1b()
    r = simulate(lower(sch) if lowered else sch, _hand_costs(), engine=engine)
    assert r.step_time == pytest.approx(16.0)
    assert r.bubble == pytest.approx([1 - 6 / 16, 1 - 10 / 16])
    assert r.peak_memory == pytest.approx([110.0, 7.0])
    ev = {(e.rank, str(e.action)): (e.start, e.end) for e in r.timeline.events if e.action.kind.is_compute}
    assert ev[(0, "0B0")] == pytest.approx((9.0, 11.0))
    assert ev[(1, "1F1")] == pytest.approx((7.5, 9.5))
    assert ev[(0, "0B1")] == pytest.approx((14.0, 16.0))


@pytest.mark.parametrize("engine", ENGINES)
def test_split_backward_memory_convention(engine: str) -> None:
    sch = Schedule("iw", [as_actions(["0F0", "0I0", "0F1", "0W0", "0I1", "0W1"])], (0,), 2)
    keep_all = CostModel(stages=[StageCost(f=1, i=2, w=3, act_bytes=10)])
    part = CostModel(stages=[StageCost(f=1, i=2, w=3, act_bytes=10, w_act_bytes=4)])
    assert simulate(sch, keep_all, engine=engine).peak_memory == [20.0]
    assert simulate(sch, part, engine=engine).peak_memory == [14.0]
    assert simulate(sch, part, engine=engine).step_time == 12.0


@pytest.mark.parametrize("engine", ENGINES)
def test_deadlock_is_reported(engine: str) -> None:
    sch = Schedule("bad", [as_actions(["0F0", "0B0"]), as_actions(["1B0", "1F0"])], (0, 1), 1)
    with pytest.raises(DeadlockError, match=r"rank 1 at action 0 \(1B0\) waits for 1F0"):
        simulate(sch, CostModel.uniform(2), engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_misfit_actions(engine: str) -> None:
    wrong_rank = Schedule("w", [as_actions(["1F0"]), as_actions(["0F0"])], (0, 1), 1)
    with pytest.raises(ValueError, match="lives on rank"):
        simulate(wrong_rank, CostModel.uniform(2), engine=engine)
    twice = Schedule("t", [as_actions(["0F0", "0F0"])], (0,), 1)
    with pytest.raises(ValueError, match="second time"):
        simulate(twice, CostModel.uniform(1), engine=engine)
    with pytest.raises(ValueError, match="cost model has 1 stages"):
        simulate(gpipe(2, 2), CostModel.uniform(1), engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_skip_connection_deps(engine: str) -> None:
    # stages 0, 1 on rank 0, stage 2 on rank 1 reads stage 1 (0 bytes) and, by a skip edge, stage 0
    # (50 bytes at 10 B/s = 5 s): 0F0 [0,1], 1F0 [1,2], 2F0 waits for the skip: [6,7].
    sch = Schedule("skip", [as_actions(["0F0", "1F0"]), as_actions(["2F0"])], (0, 0, 1), 1, {0: (), 1: (0,), 2: (0, 1)})
    c = CostModel(stages=[StageCost(f=1, send_bytes=50), StageCost(f=1), StageCost(f=1)], bandwidth=10.0)
    r = simulate(sch, c, engine=engine)
    assert r.step_time == pytest.approx(7.0)
    chain = simulate(sch.with_deps({0: (), 1: (0,), 2: (1,)}), c, engine=engine)
    assert chain.step_time == pytest.approx(3.0)


@pytest.mark.parametrize("engine", ENGINES)
def test_split_stages_use_tapped_forward_and_fused_b(engine: str) -> None:
    # stage 0's backward is split (it has I), stage 1's is not: 0F takes split_f, 1B takes fused_b
    sch = Schedule("mix", [as_actions(["0F0", "0I0", "0W0"]), as_actions(["1F0", "1B0"])], (0, 1), 1)
    c = CostModel(stages=[StageCost(f=1, split_f=2, i=1, w=1, fused_b=1.5),
                          StageCost(f=1, split_f=5, i=3, w=3, fused_b=4)])
    ev = {str(e.action): (e.start, e.end) for e in simulate(sch, c, engine=engine).timeline.events}
    assert ev["0F0"] == (0.0, 2.0) and ev["1F0"] == (2.0, 3.0) and ev["1B0"] == (3.0, 7.0)
    assert ev["0I0"] == (7.0, 8.0) and ev["0W0"] == (8.0, 9.0)


def test_engines_agree_random_costs() -> None:
    rng = random.Random(0)
    for name in SCHEDULES:
        sch = make_schedule(name, 4, 8)
        c = CostModel(
            stages=[StageCost(f=rng.uniform(0.5, 2), i=rng.uniform(0.5, 2), w=rng.uniform(0.1, 1),
                              fused_b=rng.uniform(0.5, 2), split_f=rng.uniform(0.5, 2),
                              act_bytes=rng.uniform(1, 5), send_bytes=rng.uniform(0, 50)) for _ in range(sch.num_stages)],
            latency=0.05, bandwidth=100.0,
        )
        a, b = simulate(sch, c, engine="python"), simulate(sch, c, engine="numpy")
        assert a.step_time == pytest.approx(b.step_time)
        assert a.peak_memory == pytest.approx(b.peak_memory)
        assert a.timeline.events == b.timeline.events


@pytest.mark.parametrize("engine", ENGINES)
def test_overhead_occupies_the_rank_after_each_compute_action(engine: str) -> None:
    sch = one_f_one_b(2, 4)
    base = simulate(sch, CostModel.uniform(2), engine=engine)
    c = CostModel.uniform(2)
    c.overhead = 0.25
    r = simulate(sch, c, engine=engine)
    # the critical path 0F0 1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3 0B3 pays it 9 times (not after the last action)
    assert base.step_time == 15.0 and r.step_time == pytest.approx(15.0 + 0.25 * 9)
    assert r.busy == base.busy  # bubbles count compute only
    ev = {(e.rank, str(e.action)): (e.start, e.end) for e in r.timeline.events}
    assert ev[(0, "0F0")] == (0.0, 1.0) and ev[(1, "1F0")] == (1.25, 2.25)  # outputs leave after the overhead
    assert ev[(0, "0F1")][0] == 1.25
    rng = random.Random(1)
    for name in SCHEDULES:
        sch = make_schedule(name, 4, 8)
        c = CostModel(stages=[StageCost(f=rng.uniform(0.5, 2), i=rng.uniform(0.5, 2), w=rng.uniform(0.1, 1))
                              for _ in range(sch.num_stages)], latency=0.05, overhead=rng.uniform(0.01, 0.2))
        a, b = simulate(sch, c, engine="python"), simulate(sch, c, engine="numpy")
        assert a.step_time == pytest.approx(b.step_time) and a.timeline.events == b.timeline.events


def test_many_ranks_auto_engine() -> None:
    sch = one_f_one_b(32, 64)
    r = simulate(sch, CostModel.uniform(32))
    assert r.bubble[0] == pytest.approx(31 / 95)
    assert r.peak_memory[0] == 32 and r.peak_memory[-1] == 1

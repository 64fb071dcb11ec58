"""W compaction: never slower, never more memory, same per-stage gradient order; the runtime runs it bitwise equal."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from models import check_mse_step, mlp_pipe, mse

from pippy.runtime.api import ScheduleDualPipeV, ScheduleZBV
from pippy.runtime.local import LocalPipeline
from pippy.schedules.generators import SCHEDULES, make_schedule
from pippy.schedules.ir import Kind, Schedule, as_actions
from pippy.schedules.lower import runtime_form
from pippy.schedules.validate import validate
from pippy.sim.bound import lower_bound
from pippy.sim.choose import default_costs, fastest_form
from pippy.sim.compact import compact_w
from pippy.sim.cost import CostModel, StageCost
from pippy.sim.simulate import simulate

SPLIT = [n for n in SCHEDULES if make_schedule(n, 2, 4).uses_split_backward()]


def _grad_order(s: Schedule) -> dict[int, list[tuple[str, int]]]:
    """Per stage, the order its B's and W's add into the parameters' ``.grad``."""
    out: dict[int, list[tuple[str, int]]] = {}
    for acts in s.actions:
        for a in acts:
            if a.kind in (Kind.B, Kind.W):
                out.setdefault(a.stage, []).append((a.kind.value, a.mb))
    return out


def _random_costs(n: int, seed: int) -> CostModel:
    rnd = random.Random(seed)
    stages = [StageCost(f=rnd.uniform(0.5, 2), i=rnd.uniform(0.5, 2), w=rnd.uniform(0.2, 2),
                        fused_b=rnd.choice([None, rnd.uniform(0.8, 3)]), act_bytes=rnd.uniform(1, 3),
                        split_f=rnd.choice([None, rnd.uniform(0.5, 2.5)])) for _ in range(n)]
    return CostModel(stages=stages, latency=rnd.uniform(0, 0.3))


@pytest.mark.parametrize("name", SPLIT)
def test_never_slower_never_more_memory_same_grad_order(name: str) -> None:
    for p in (2, 3, 4):
        for m in (p, 2 * p, 2 * p + 1):
            try:
                sch = make_schedule(name, p, m)
            except ValueError:  # e.g. DualPipeV's m >= 2p - 1
                continue
            for seed in range(-1, 4):
                costs = default_costs(sch.num_stages) if seed < 0 else _random_costs(sch.num_stages, seed)
                for fuse in (True, False):
                    form = runtime_form(sch, fuse=fuse)
                    out = compact_w(form, costs)
                    validate(out)
                    before, after = simulate(form, costs), simulate(out, costs)
                    where = (name, p, m, seed, fuse)
                    assert after.step_time <= before.step_time + 1e-9, where
                    assert all(a <= b + 1e-9 for a, b in zip(after.peak_memory, before.peak_memory)), where
                    assert lower_bound(out, costs) <= after.step_time + 1e-9, where
                    assert [Counter(r) for r in out.actions] == [Counter(r) for r in form.actions], where
                    assert _grad_order(out) == _grad_order(form), where  # bitwise the same sums


def test_the_zbv_tail_fills_its_wait_and_ends_sooner() -> None:
    """ZB-V, p=2, m=4, default costs: rank 1 waited for stage 3's gradient with 2W2 at its program's end."""
    costs = default_costs(4)
    form, _ = fastest_form(make_schedule("zbv", 2, 4), costs)
    out = compact_w(form, costs)
    tail = [str(a) for a in out.actions[1][-8:]]
    assert tail == ["2I2", "1I2", "2W2", "2I3", "1I3", "1W2", "2W3", "1W3"]
    assert [str(a) for a in form.actions[1][-8:]] == ["2I2", "1I2", "2I3", "1I3", "2W2", "1W2", "2W3", "1W3"]
    assert simulate(out, costs).step_time == 23.5 < simulate(form, costs).step_time == 24.5
    assert fastest_form(make_schedule("zbv", 2, 4), costs, compact=True)[0] == out


def test_a_w_too_long_for_the_gap_stays() -> None:
    s = Schedule("tail", [as_actions(["0F0", "0F1", "0I0", "0I1", "0W0", "0W1"]),
                          as_actions(["1F0", "1F1", "1B0", "1B1"])], (0, 1), 2)
    long_w = CostModel(stages=[StageCost(f=1, i=1, w=1.5), StageCost(f=1, i=1, w=1)])
    assert compact_w(s, long_w) is s  # the gap before 0I1 is 1 unit (1B1 takes 2, 0I0 1)
    moved = compact_w(s, CostModel.uniform(2))
    assert [str(a) for a in moved.actions[0]] == ["0F0", "0F1", "0I0", "0W0", "0I1", "0W1"]
    assert compact_w(s, CostModel.uniform(2), max_moves=0) is s


def test_lowered_schedules_are_refused_with_the_fix() -> None:
    from pippy.schedules.lower import lower

    with pytest.raises(ValueError, match=r"holds SEND/RECV actions; pass its compute-only form"):
        compact_w(lower(make_schedule("zb_h1", 2, 4)), CostModel.uniform(2))


@pytest.mark.parametrize(("cls", "n_stages"), [(ScheduleZBV, 4), (ScheduleDualPipeV, 4)])
def test_the_runtime_runs_compacted_and_stays_bitwise(cls: type, n_stages: int) -> None:
    model, pipe, x, y = mlp_pipe(n_stages, 4)
    runs = {}
    for fill in (True, False):
        lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=4, loss_fn=mse, fill_bubbles=fill)
        check_mse_step(lp, model, x, y)
        runs[fill] = (lp, {k: v.clone() for k, v in lp.named_grads().items() if v is not None})
    (on, g_on), (off, g_off) = runs[True], runs[False]
    assert g_on.keys() == g_off.keys()
    for k in g_on:
        assert torch.equal(g_on[k], g_off[k]), k  # same per-stage order: bitwise equal
    s_on = [sch.schedule.compute_only() for sch in on.schedules]
    s_off = [sch.schedule.compute_only() for sch in off.schedules]
    # a W moved into rank 1's wait for stage 3's gradient (both V schedules, default costs)
    assert s_on[1].actions[1] != s_off[1].actions[1]
    assert s_on[1].actions[1] == compact_w(s_off[1], default_costs(4)).actions[1]


@pytest.mark.parametrize("heavy_last", [False, True])
def test_every_schedule_class_compacts_for_the_costs_it_is_given(heavy_last: bool) -> None:
    """``costs=`` reaches every class (here DualPipeV), and its W's go where those costs say they fit."""
    model, pipe, x, y = mlp_pipe(4, 4)
    costs = None
    if heavy_last:  # an LM-head-like last stage: rank 0 works longer, rank 1 waits more
        costs = CostModel(stages=[StageCost(f=1, i=1, w=1, fused_b=1.5)] * 3 + [StageCost(f=3, i=3, w=2, fused_b=4.5)])
    lp = LocalPipeline(pipe, ScheduleDualPipeV, num_ranks=2, n_microbatches=4, loss_fn=mse, costs=costs)
    check_mse_step(lp, model, x, y)
    want = compact_w(runtime_form(make_schedule("dualpipev", 2, 4)), costs or default_costs(4))
    for r, sch in enumerate(lp.schedules):
        assert sch.costs is costs
        assert sch.schedule.compute_only().actions[r] == want.actions[r]
    assert (want.actions != compact_w(runtime_form(make_schedule("dualpipev", 2, 4)), default_costs(4)).actions) \
        == heavy_last

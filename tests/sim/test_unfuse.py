"""Splitting B's where faster: never slower, never more memory per rank, same per-stage order; the runtime runs it."""

from __future__ import annotations

from collections import Counter

import pytest
from models import check_mse_step, mlp_pipe, mse, schedule_cost_cases

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
from pippy.sim.unfuse import split_where_faster

SPLIT = [n for n in SCHEDULES if make_schedule(n, 2, 4).uses_split_backward()]


def _mb_order(s: Schedule) -> dict[int, list[int]]:
    """Per stage, the micro-batch order in which its B's or W's add into ``.grad``."""
    out: dict[int, list[int]] = {}
    for acts in s.actions:
        for a in acts:
            if a.kind in (Kind.B, Kind.W):
                out.setdefault(a.stage, []).append(a.mb)
    return out


def _backward_work(s: Schedule) -> list[Counter[tuple[int, int]]]:
    """Per rank, which (stage, micro-batch) backwards it runs, whole or split alike."""
    return [Counter((a.stage, a.mb) for a in acts if a.kind in (Kind.B, Kind.I)) for acts in s.actions]


@pytest.mark.parametrize("name", SPLIT)
def test_never_slower_never_more_memory_same_order(name: str) -> None:
    for p, m, sch, seed, costs in schedule_cost_cases(name):
        form = compact_w(runtime_form(sch), costs)
        out = split_where_faster(form, costs)
        validate(out)
        before, after = simulate(form, costs), simulate(out, costs)
        where = (name, p, m, seed)
        assert after.step_time <= before.step_time + 1e-9, where
        assert all(a <= b * (1 + 1e-9) for a, b in zip(after.peak_memory, before.peak_memory)), where
        assert lower_bound(out, costs) <= after.step_time + 1e-9, where
        assert _backward_work(out) == _backward_work(form), where
        assert _mb_order(out) == _mb_order(form), where


def test_zbv_and_dualpipev_reach_the_bound_under_default_costs() -> None:
    for name in ("zbv", "dualpipev"):
        for m in (8, 16):
            costs = default_costs(8)
            plain = compact_w(runtime_form(make_schedule(name, 4, m)), costs)
            form, fused = fastest_form(make_schedule(name, 4, m), costs, mixed=True)
            assert fused and simulate(form, costs).step_time == lower_bound(form, costs) \
                < simulate(plain, costs).step_time, (name, m)
            assert any(a.kind is Kind.B and a.stage for acts in form.actions for a in acts)  # still mixed
            assert any(a.kind is Kind.I for acts in form.actions for a in acts)


def test_gradless_stages_and_small_schedules_stay() -> None:
    s = Schedule("one", [as_actions(["0F0", "0B0"])], (0,), 1)
    assert split_where_faster(s, CostModel.uniform(1)) is s
    form = compact_w(runtime_form(make_schedule("zbv", 4, 8)), default_costs(8))
    assert split_where_faster(form, default_costs(8), max_tries=0) is form
    every = split_where_faster(form, default_costs(8), gradless_stages=range(8))
    assert every is form  # no stage may split: nothing changes


@pytest.mark.parametrize("cls", [ScheduleZBV, ScheduleDualPipeV])
def test_auto_runs_the_mixed_form_transparently(cls: type) -> None:
    model, pipe, x, y = mlp_pipe(4, 8)
    costs = CostModel(stages=[StageCost(f=1, i=1, w=1, fused_b=1.5)] * 3 + [StageCost(f=2, i=2, w=1.5, fused_b=3)])
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=8, loss_fn=mse, costs=costs, fuse_backward="auto")
    for _ in range(2):
        check_mse_step(lp, model, x, y)
    gen = make_schedule("zbv" if cls is ScheduleZBV else "dualpipev", 2, 8)
    gen = gen if cls is not ScheduleZBV else lp.schedules[0]._generate()
    want, fused = fastest_form(gen, costs, mixed=True)
    assert fused and want.actions != compact_w(runtime_form(gen), costs).actions  # some B's did split
    for r, sch in enumerate(lp.schedules):
        assert sch.schedule.compute_only().actions[r] == want.actions[r]

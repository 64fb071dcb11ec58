"""Schedule synthesis: valid, never slower than the best fixed schedule, within the memory limit, and transparent."""

from __future__ import annotations

import pytest
import torch
from models import MLPStack, check_mse_step, mse

from pippy import SplitPoint, pipeline
from pippy.cli import main
from pippy.runtime.api import ScheduleSynthesized
from pippy.runtime.local import LocalPipeline
from pippy.schedules.ir import v_placement
from pippy.schedules.lower import runtime_form
from pippy.schedules.validate import validate
from pippy.sim.bound import lower_bound
from pippy.sim.choose import fastest_form
from pippy.sim.compact import compact_w
from pippy.sim.cost import CostModel, StageCost
from pippy.sim.simulate import simulate
from pippy.sim.synthesize import Rule, list_schedule, synthesize

CPU = [StageCost(f=1.0, i=1.0, w=1.0, fused_b=1.5, act_bytes=1.0)]  # a whole backward cheaper than I + W


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("m", [2, 4, 8, 16])
@pytest.mark.parametrize("per_rank", [1, 2])
@pytest.mark.parametrize("kind", ["unit", "cpu"])
def test_never_slower_than_the_best_fixed_schedule(p: int, m: int, per_rank: int, kind: str) -> None:
    n = p * per_rank
    costs = CostModel.uniform(n) if kind == "unit" else CostModel(stages=CPU * n)
    syn = synthesize(p, m, costs)
    validate(syn.schedule)
    form = compact_w(runtime_form(syn.schedule), costs)  # as the runtime runs it
    validate(form)
    assert syn.step_time == pytest.approx(simulate(form, costs).step_time)  # what it reports is what it chose
    assert syn.step_time >= lower_bound(form, costs) - 1e-9
    fixed = [t for label, t, _ in syn.tried if " " not in label]  # built candidates are labelled "<place> <rule>"
    assert fixed and syn.step_time <= min(fixed) + 1e-9
    assert syn.built == (syn.step_time < min(fixed) - 1e-12)


def test_it_builds_what_no_fixed_schedule_reaches() -> None:
    """Unit costs, 2 stages per rank: the built V reaches the bound; the best fixed schedule (interleaved 1F1B,
    fused as the runtime runs it) does not."""
    syn = synthesize(4, 8, CostModel.uniform(8))
    assert syn.built and syn.step_time < syn.best_fixed_time
    assert syn.step_time == pytest.approx(lower_bound(runtime_form(syn.schedule), CostModel.uniform(8)))


def test_memory_limit_is_kept_and_a_too_small_one_is_an_error() -> None:
    costs = CostModel.uniform(4)  # 1 byte per stage-micro-batch
    free = synthesize(2, 8, costs)
    tight = synthesize(2, 8, costs, memory_limit=3)
    assert max(simulate(runtime_form(tight.schedule), costs).peak_memory) <= 3 < free.peak_memory
    assert tight.step_time >= free.step_time
    with pytest.raises(ValueError, match=r"no schedule for p=2, m=8 fits memory_limit=0.5 bytes per rank"):
        synthesize(2, 8, costs, memory_limit=0.5)
    with pytest.raises(ValueError, match=r"no placement of 3 stages on 2 ranks"):
        synthesize(2, 4, CostModel.uniform(3))


def test_list_schedule_follows_the_rule() -> None:
    whole = list_schedule(2, 3, (0, 1), CostModel.uniform(2), Rule(cap=None, split=False))
    assert [str(a) for a in whole.actions[1]] == ["1F0", "1I0", "1W0", "1F1", "1I1", "1W1", "1F2", "1I2", "1W2"]
    bfs = list_schedule(2, 3, (0, 1), CostModel.uniform(2), Rule(cap=None, split=False, f_first=True))
    assert [str(a) for a in bfs.actions[0]][:3] == ["0F0", "0F1", "0F2"]
    capped = list_schedule(2, 4, v_placement(2), CostModel.uniform(4), Rule(cap=4, split=True))
    validate(capped)
    assert max(simulate(capped, CostModel.uniform(4)).peak_memory) <= 4
    with pytest.raises(RuntimeError, match="the in-flight cap or the memory limit leaves no way forward"):
        list_schedule(2, 4, v_placement(2), CostModel.uniform(4), Rule(cap=2, split=True))


def test_unit_costs_keep_zbv_unfused_at_its_bound() -> None:
    from pippy.schedules.zero_bubble import dualpipev, zbv

    costs = CostModel.uniform(4).rebin(8)
    for sch in (zbv(4, 8, "split"), dualpipev(4, 8)):
        form, fused = fastest_form(sch, costs)
        assert not fused
        assert simulate(form, costs).step_time == pytest.approx(lower_bound(form, costs))


class _V(ScheduleSynthesized):
    @classmethod
    def placement(cls, num_ranks: int, stages_per_rank: int = 2) -> tuple[int, ...]:
        return v_placement(num_ranks)


@pytest.mark.parametrize(("cls", "n_stages"), [(ScheduleSynthesized, 2), (ScheduleSynthesized, 4), (_V, 4)])
def test_synthesized_schedules_run_transparently(cls: type, n_stages: int) -> None:
    torch.manual_seed(0)
    model = MLPStack(n=4, d=8).double()
    spec = {f"blocks.{4 // n_stages * (i + 1) - 1}": SplitPoint.END for i in range(n_stages - 1)}
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    pipe = pipeline(model, 4, (x,), split_spec=spec)
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=4, loss_fn=mse, costs=CostModel.uniform(n_stages))
    check_mse_step(lp, model, x, y)
    syn = lp.schedules[0].synthesis
    assert syn is not None and syn.schedule.stage_to_rank == cls.placement(2, n_stages // 2)


class _Blocks(ScheduleSynthesized):
    @classmethod
    def placement(cls, num_ranks: int, stages_per_rank: int = 2) -> tuple[int, ...]:
        return (0, 0, 1, 1)  # neighbours on one rank: neither the loop nor the V


def test_a_rank_given_stages_of_no_known_placement_is_told_how() -> None:
    pipe = pipeline(MLPStack(n=4, d=8).double(), 4, (torch.randn(8, 8, dtype=torch.float64),),
                    split_spec={f"blocks.{i}": SplitPoint.END for i in range(3)})
    with pytest.raises(ValueError, match=r"rank 0 of 2: this rank holds stages \[0, 1\] of 4; the synthesizer places"):
        LocalPipeline(pipe, _Blocks, num_ranks=2, n_microbatches=4, loss_fn=lambda o, t: o.sum(), loss_reduction="sum")


def test_tune_synthesize_prints_and_saves(tmp_path, capsys) -> None:
    costs = CostModel.uniform(2)
    for s in costs.stages:
        s.act_bytes = 1e6
    path = tmp_path / "c.json"
    costs.to_json(str(path))
    csv = tmp_path / "s.csv"
    assert main(["tune", "--costs", str(path), "--memory-limit", "1GB", "--microbatches-choices", "4,8",
                 "--synthesize", "--save-csv", str(csv)]) == 0
    out = capsys.readouterr().out
    # W's compacted into the gaps, fixed DualPipeV ties the best built V (3.0625 s) at a third of its memory
    assert "synthesized: 4 stages, 8 micro-batches, no built schedule beat the fixed dualpipev" in out
    assert "rank 1" in out and "runs it as saved (predicted 3.188s)" in out  # W's not moved: 3.188 s, not 3.062
    from pippy.schedules.lower import from_csv

    validate(from_csv(str(csv)))


@pytest.mark.parametrize(("costs", "fused"), [(None, True), (CostModel.uniform(4), False)])
def test_fuse_backward_auto_follows_the_costs(costs: CostModel | None, fused: bool) -> None:
    from pippy import ScheduleZBV

    class _ZBV(ScheduleZBV):
        @classmethod
        def placement(cls, num_ranks: int, stages_per_rank: int = 2) -> tuple[int, ...]:
            return v_placement(num_ranks)

    torch.manual_seed(0)
    model = MLPStack(n=4, d=8).double()
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    pipe = pipeline(model, 8, (x,), split_spec={f"blocks.{i}": SplitPoint.END for i in range(3)})
    lp = LocalPipeline(pipe, _ZBV, num_ranks=2, n_microbatches=8, loss_fn=mse, costs=costs, fuse_backward="auto")
    assert all(s.fused_backward is fused for s in lp.schedules)
    check_mse_step(lp, model, x, y)


def test_odd_ranks_need_the_layout_named() -> None:
    torch.manual_seed(0)
    model = MLPStack(n=6, d=8).double()
    x, y = torch.randn(12, 8, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
    pipe = pipeline(model, 6, (x,), split_spec={f"blocks.{i}": SplitPoint.END for i in range(5)})
    with pytest.raises(ValueError, match="with 3 ranks \\(odd\\) the middle rank's stages fit both"):
        LocalPipeline(pipe, _V, num_ranks=3, n_microbatches=6, loss_fn=mse)
    lp = LocalPipeline(pipe, _V, num_ranks=3, n_microbatches=6, loss_fn=mse, layout="v")
    assert {s.synthesis.schedule.stage_to_rank for s in lp.schedules} == {v_placement(3)}
    check_mse_step(lp, model, x, y)


def test_more_than_two_stages_per_rank_label_the_fixed_schedules_truthfully() -> None:
    syn = synthesize(2, 4, CostModel.uniform(6))
    fixed = [label for label, _, _ in syn.tried if " " not in label]
    assert fixed == ["interleaved_1f1b", "looped_bfs"], fixed
    assert syn.best_fixed in fixed


def test_tune_synthesizes_even_when_no_fixed_schedule_fits(tmp_path, capsys) -> None:
    costs = CostModel.uniform(2)
    path = tmp_path / "c.json"
    costs.to_json(str(path))
    # at m=4 a micro-batch keeps 0.25 bytes per stage: every fixed schedule holds 2 on rank 0 (0.5 > 0.3), a
    # built one may hold just 1
    assert main(["tune", "--costs", str(path), "--memory-limit", "0.3", "--microbatches-choices", "4",
                 "--synthesize"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no schedule fits") and "synthesized: 2 stages, 4 micro-batches, built by rule" in out
    assert main(["tune", "--costs", str(path), "--memory-limit", "0.1", "--microbatches-choices", "4",
                 "--synthesize"]) == 1
    assert "synthesized: nothing fits the limit" in capsys.readouterr().out
    assert main(["tune", "--costs", str(path), "--memory-limit", "1e9", "--save-csv", str(tmp_path / "x.csv")]) == 2
    assert "--save-csv writes the synthesized schedule; add --synthesize" in capsys.readouterr().err

"""One activation counter: the profiler's act_bytes and the runtime's live bytes count the same storages."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from models import gpt2, lm_loss

import pippy
from pippy import SplitPoint, pipeline
from pippy.runtime.local import LocalPipeline
from pippy.sim.memory import SavedBytes
from pippy.sim.simulate import simulate


def test_profile_and_runtime_count_the_same_bytes() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    pipe = pipeline(net, 2, example_args=(x,), split_spec={"2": SplitPoint.BEGINNING})
    costs = pippy.profile(pipe, (x,), repeats=1, warmup=0)
    for s in range(2):
        stage = pipe.build_stage(s, "cpu")
        stage.measure_activations = True
        ins = [x[:4]] if s == 0 else [torch.randn(4, 32)]
        stage.forward(0, ins, training=True)
        assert stage.live_activation_bytes() == costs.stages[s].act_bytes > 0, s


def test_parameters_and_repeated_storages_count_once_or_not_at_all() -> None:
    w = torch.nn.Parameter(torch.ones(4, 4))
    x = torch.ones(2, 4)
    with SavedBytes(skip=[w]) as c:
        h = x @ w  # saves x (w skipped)
        _ = h * h  # saves h twice: one storage
    assert c.total == 2 * 4 * 4 + 2 * 4 * 4


def _gpt2_pipe(n_stages: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = gpt2(n_layer=n_stages, width=32, vocab=96, seq=16)
    x, y = torch.randint(0, 96, (8, 16)), torch.randint(0, 96, (8, 16))
    split = {f"transformer.h.{i}": SplitPoint.END for i in range(n_stages - 1)}
    return pipeline(model, 4, example_args=(x,), split_spec=split), x, y


def test_profile_counts_what_the_stage_holds_from_i_to_w() -> None:
    pipe, x, y = _gpt2_pipe(2)
    costs = pippy.profile(pipe, (x,), loss_fn=lm_loss, target=y, repeats=1, warmup=0)
    assert costs.stages[0].w_act_bytes is None  # token ids need no gradient: that stage never splits
    stage = pipe.build_stage(1, "cpu")
    stage.measure_activations = True
    h = torch.randn(2, 16, 32, dtype=torch.float64, requires_grad=True)
    out = stage.forward(0, [h], training=True, split_backward=True)
    with stage.counting_loss(0):
        loss = lm_loss(pipe.unflatten_output(out), y[:2])
    stage.set_loss(0, loss)
    after_f = stage.live_activation_bytes()
    assert after_f == costs.stages[1].act_bytes
    stage.backward_input(0)
    held = stage.live_activation_bytes()
    assert held == costs.stages[1].w_act_bytes
    assert 0 < held < after_f  # the graph is freed; W's inputs and the gradients I computed for it stay
    stage.backward_weight(0)
    assert stage.live_activation_bytes() == 0


def test_split_backward_frees_what_w_does_not_read() -> None:
    pipe, _, y = _gpt2_pipe(2)
    stage = pipe.build_stage(1, "cpu")
    h = torch.randn(2, 16, 32, dtype=torch.float64, requires_grad=True)
    out = stage.forward(0, [h], training=True, split_backward=True)
    stage.set_loss(0, lm_loss(pipe.unflatten_output(out), y[:2]))
    logits = weakref.ref(stage.output(0, 0))
    del out
    stage.backward_input(0)
    assert logits() is None  # the outputs (and the loss) are not held until W
    assert stage.held_outputs(0) == []


@pytest.mark.parametrize("cls", [pippy.ScheduleZBH1, pippy.ScheduleZBV, pippy.ScheduleDualPipeV, pippy.Schedule1F1B])
def test_simulated_peak_equals_the_runtime_count(cls: type) -> None:
    """The simulator's per-rank activation peak, from profiled costs, is what the runtime counts in the step."""
    pipe, x, y = _gpt2_pipe(4 if cls in (pippy.ScheduleZBV, pippy.ScheduleDualPipeV) else 2)
    costs = pippy.profile(pipe, (x,), loss_fn=lm_loss, target=y, repeats=1, warmup=0)
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=4, loss_fn=lm_loss, costs=costs)
    for st in lp.stages:
        st.measure_activations = True
    lp.step(x, target=y)
    sched = lp.schedules[0].schedule
    assert sched is not None
    sim = simulate(sched, costs)
    for r in range(2):
        static = sum(c.static_bytes for s, c in enumerate(costs.stages) if sched.stage_to_rank[s] == r)
        assert lp.schedules[r].last_peak_bytes[r] == sim.peak_memory[r] - static > 0, r

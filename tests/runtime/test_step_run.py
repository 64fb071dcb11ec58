"""The public step path every driver shares: begin, drive the StepRun, finish; forward-only activations live in the stage."""

from __future__ import annotations

import copy

import pytest
import torch
from models import SkipNet, mse

import pippy
from pippy import pipeline
from pippy.runtime.local import LocalPipeline
from pippy.runtime.localcomm import LocalTransport
from pippy.runtime.stage import Stage, StageError


def _two_rank_1f1b():
    torch.manual_seed(0)
    model = SkipNet(2).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 2, (x,))
    ends = LocalTransport.world(2)
    stages = [Stage(pipe, s) for s in range(2)]
    scheds = [pippy.Schedule1F1B(stages[r], 2, mse, transport=ends[r]) for r in range(2)]
    return model, x, y, stages, scheds, ends


def test_begin_advance_finish_by_hand() -> None:
    model, x, y, stages, scheds, _ = _two_rank_1f1b()
    runs = [scheds[0].begin((x,)), scheds[1].begin(target=y)]
    while not all(r.done for r in runs):
        for r in runs:
            if not r.done:
                r.advance()
    losses: list[torch.Tensor] = []
    assert scheds[0].finish(runs[0], losses) is None and losses == []
    out = scheds[1].finish(runs[1], losses)
    assert torch.allclose(out, model(x), atol=1e-12) and len(losses) == 2
    mse(model(x), y).backward()
    for st in stages:
        for name, p in st.submod.named_parameters():
            assert torch.allclose(p.grad, model.get_parameter(name).grad, atol=1e-12), name


def test_finish_needs_a_finished_run() -> None:
    _, x, _, _, scheds, _ = _two_rank_1f1b()
    run = scheds[0].begin((x,))
    with pytest.raises(StageError, match="ran to its end"):
        scheds[0].finish(run)


def test_abort_with_messages_in_flight_refuses_the_next_step() -> None:
    _, x, _, stages, scheds, _ = _two_rank_1f1b()
    run = scheds[0].begin((x,))
    run.advance()  # rank 0 ran its forwards and posted sends, then waits for gradients
    assert stages[0].live_microbatches() > 0
    run.abort(RuntimeError("peer died"))
    assert stages[0].live_microbatches() == 0
    with pytest.raises(StageError, match=r"earlier step failed here \(RuntimeError: peer died"):
        scheds[0].begin((x,))


def test_forward_only_outputs_are_freed_at_their_last_reader() -> None:
    torch.manual_seed(0)
    model = SkipNet(4).double()  # stage 0 feeds stage 1 and, by a skip edge, stage 3
    x = torch.randn(8, 8, dtype=torch.float64)
    lp = LocalPipeline(pipeline(copy.deepcopy(model), 4, (x,)), pippy.ScheduleInterleaved1F1B,
                       num_ranks=2, n_microbatches=4, loss_fn=mse)
    assert torch.allclose(lp.eval(x), model(x), atol=1e-12)
    assert [st.live_microbatches() for st in lp.stages] == [0, 0, 0, 0]


def test_stage_keeps_forward_only_outputs_for_its_readers() -> None:
    pipe = pipeline(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), 1, (torch.ones(1, 2),),
                    split_spec={"0": pippy.SplitPoint.END})
    stage = Stage(pipe, 0)
    stage.forward(0, [torch.ones(1, 2)], training=False, readers=2)
    stage.release(0)
    assert stage.output(0, 0).shape == (1, 2)
    stage.release(0)
    assert stage.live_microbatches() == 0
    stage.forward(0, [torch.ones(1, 2)], training=False)  # no reader: nothing kept
    assert stage.live_microbatches() == 0


class TakesTarget(torch.nn.Module):
    """A model whose own keyword argument is called ``target``, like a schedule option."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, *, target: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        pippy.pipe_split()
        return self.b(h) + target


def test_model_keyword_named_like_an_option_reaches_the_model() -> None:
    torch.manual_seed(0)
    model = TakesTarget().double()
    x, t = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 2, (x,), {"target": t})
    lp = LocalPipeline(pipe, pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2, loss_fn=mse)
    assert torch.allclose(lp.eval(x, target=t), model(x, target=t), atol=1e-12)


def _raise_at_forward(stage: Stage, k: int) -> None:
    inner, calls = stage.submod.forward, [0]

    def forward(*args):
        calls[0] += 1
        if calls[0] == k:
            raise ValueError("boom")
        return inner(*args)

    stage.submod.forward = forward


def test_a_failed_step_leaves_grads_as_before_or_says_it_did_not() -> None:
    _, x, y, stages, scheds, _ = _two_rank_1f1b()
    lp_like = [scheds[0].begin((x,)), scheds[1].begin(target=y)]
    while not all(r.done for r in lp_like):  # one good step: grads now hold values
        for r in lp_like:
            if not r.done:
                r.advance()
    before = {n: p.grad.clone() for st in stages for n, p in st.submod.named_parameters()}
    _raise_at_forward(stages[1], 2)  # micro-batch 1: micro-batch 0's backward already ran
    runs = [scheds[0].begin((x,)), scheds[1].begin(target=y)]
    with pytest.raises(ValueError, match="boom") as info:
        for _ in range(100):
            for r in runs:
                if not r.done:
                    r.advance()
    runs[1].abort(info.value)
    notes = "\n".join(info.value.__notes__)
    assert "raised at rank 1, stage 1, action 1F" in notes and "holds part of the failed step" in notes
    assert any(not torch.equal(p.grad, before[n]) for st in stages for n, p in st.submod.named_parameters())


def test_a_failed_step_from_zero_grad_rolls_grads_back_to_none() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64)
    pipe = pipeline(SkipNet(2).double(), 4, (x,))
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=mse)
    _raise_at_forward(lp.stages[1], 3)  # micro-batch 2 of stage 1: some backward already ran
    with pytest.raises(ValueError, match="boom") as info:
        lp.step(x, target=torch.randn(4, 3, dtype=torch.float64))
    assert "reset to None" in "\n".join(info.value.__notes__)
    assert all(p.grad is None for st in lp.stages for p in st.parameters())


def test_in_process_failure_names_only_the_rank_that_raised_and_notes_once() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64)
    pipe = pipeline(SkipNet(3).double(), 2, (x,))
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=3, n_microbatches=2, loss_fn=mse)
    _raise_at_forward(lp.stages[1], 1)
    with pytest.raises(ValueError, match="boom") as info:
        lp.step(x, target=torch.randn(4, 3, dtype=torch.float64))
    notes = info.value.__notes__
    assert [n for n in notes if "raised at" in n] == ["pippy: raised at rank 1, stage 1, action 1F0 (micro-batch 0)"]
    assert len(notes) == len(set(notes))

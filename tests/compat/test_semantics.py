"""Where PiPPy's behaviour differed, pippy's decisions hold: forward-only without a loss, reduction read off the loss, warned cases."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import MLPStack

from pippy import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    SplitPoint,
    pipeline,
)
from pippy._IR import LossWrapper, PipeSequential, TrivialLossWrapper
from pippy.runtime.local import LocalPipeline
from pippy.runtime.localcomm import LocalTransport

TOL = 1e-12
M = 4


def _case(n_stages: int = 2):
    torch.manual_seed(0)
    model = MLPStack(2 * n_stages).double()
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    spec = {f"blocks.{2 * k + 1}": SplitPoint.END for k in range(n_stages - 1)}
    return model, pipeline(copy.deepcopy(model), M, (x,), split_spec=spec), x, y


def _grads_after(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _sum_mse(out, target):
    return F.mse_loss(out, target, reduction="sum")


@pytest.mark.parametrize(("loss_fn", "reduction"), [
    (torch.nn.MSELoss(reduction="sum"), "sum"),
    (torch.nn.MSELoss(), "mean"),
    (functools.partial(F.mse_loss, reduction="sum"), "sum"),
    (F.mse_loss, "mean"),
])
def test_reduction_is_read_off_the_loss(loss_fn, reduction) -> None:
    """A sum-reduced loss sums micro-batch losses (PiPPy's behaviour); a mean-reduced one averages: grads match either way."""
    model, pipe, x, y = _case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a readable reduction is used without a warning
        lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=M, loss_fn=loss_fn)
    assert lp.schedules[0].loss_reduction == reduction
    lp.step(x, target=y)
    ref = _grads_after(model, F.mse_loss(model(x), y, reduction=reduction))
    got = lp.named_grads()
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=TOL)


def test_an_unreadable_reduction_warns_and_averages_and_can_be_given() -> None:
    model, pipe, x, y = _case()
    with pytest.warns(UserWarning, match=r"cannot tell whether loss_fn '_sum_mse' sums or averages.*loss_reduction='sum'"):
        LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=M, loss_fn=_sum_mse)
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=M, loss_fn=_sum_mse, loss_reduction="sum")
    lp.step(x, target=y)
    ref = _grads_after(model, _sum_mse(model(x), y))
    for name, g in ref.items():
        torch.testing.assert_close(lp.named_grads()[name], g, rtol=0, atol=TOL)


@pytest.mark.parametrize("cls", [ScheduleGPipe, Schedule1F1B])
def test_step_without_a_loss_runs_forward_only_with_a_warning(cls) -> None:
    model, pipe, x, _ = _case()
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=M)
    with pytest.warns(UserWarning, match="ran forward only"):
        out = lp.step(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=TOL)
    assert all(g is None for g in lp.named_grads().values())


def test_a_model_that_returns_its_loss_trains_without_loss_fn() -> None:
    """PiPPy's LossWrapper pattern: the model's forward returns the loss; step() trains on it."""
    torch.manual_seed(0)
    inner = PipeSequential.from_sequential(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))).double()
    model = TrivialLossWrapper(inner, functools.partial(F.mse_loss, reduction="sum"))
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), M, (x, y))
    assert pipe.num_stages == 3
    lp = LocalPipeline(pipe, ScheduleGPipe, num_ranks=3, n_microbatches=M, loss_reduction="sum")
    losses: list[torch.Tensor] = []
    lp.step(x, y, losses=losses)
    ref = _grads_after(model, model(x, y))
    torch.testing.assert_close(torch.stack(losses).sum(), model(x, y), rtol=0, atol=1e-10)
    for name, g in ref.items():
        torch.testing.assert_close(lp.named_grads()[name], g, rtol=0, atol=TOL)
    with pytest.raises(NotImplementedError, match="subclass LossWrapper"):
        LossWrapper(inner, F.mse_loss)(x, y)


def test_inputs_on_a_rank_without_stage_zero_are_ignored_with_a_warning() -> None:
    _, pipe, x, y = _case()
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=M, loss_fn=torch.nn.MSELoss())
    later = lp.schedules[1]
    with pytest.warns(UserWarning, match="does not hold stage 0: the inputs given to step"):
        later._inputs((x,), {}, y, True)


def test_interleaved_needs_two_stages_per_rank() -> None:
    _, pipe, _, _ = _case()
    with pytest.raises(ValueError, match="interleaving needs at least 2 stages per rank, got 1"):
        ScheduleInterleaved1F1B([pipe.build_stage(0, "cpu")], M, loss_fn=torch.nn.MSELoss(),
                                transport=LocalTransport.world(2)[0])


def test_step_microbatches_and_its_input_checks() -> None:
    """PiPPy's ``_step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses)`` equals ``step()`` on the joined batch."""
    torch.manual_seed(0)
    model = MLPStack(2).double()
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    pipe = pipeline(model, M, (x,))
    sched = ScheduleGPipe(pipe.build_stage(0, "cpu"), M, loss_fn=torch.nn.MSELoss(), transport=LocalTransport.world(1)[0])
    xs, ys = list(x.chunk(M)), list(y.chunk(M))
    with pytest.raises(ValueError, match="expected 4 micro-batches of positional inputs"):
        sched._step_microbatches(xs[:3], target_mbs=ys)
    with pytest.raises(TypeError, match="must be a list with one entry per micro-batch"):
        sched._step_microbatches(x)
    losses: list[torch.Tensor] = []
    out = sched._step_microbatches(xs, target_mbs=ys, losses=losses)
    got = {n: p.grad.clone() for n, p in sched.stages[0].submod.named_parameters()}
    torch.testing.assert_close(out, model(x), rtol=0, atol=TOL)
    assert len(losses) == M
    ref = _grads_after(model, F.mse_loss(model(x), y))
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=TOL)

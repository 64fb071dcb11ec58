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
    TensorChunkSpec,
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


@pytest.mark.parametrize(("loss_fn", "reduction"), [
    (_sum_mse, "sum"),
    (lambda out, y: ((out - y) ** 2).sum() / out.shape[0], "mean"),
    (lambda out, y: ((out - y) ** 2).mean(), "mean"),
    (lambda out, y: ((out - y) ** 2).sum(dim=1).mean() * 3.0, "mean"),
])
def test_an_unreadable_reduction_is_measured_on_the_first_micro_batch(loss_fn, reduction) -> None:
    """A plain function says nothing of its reduction: the first micro-batch twice over measures it (the same loss:
    a mean; double: a sum), without a warning, and grads equal the full-batch loss's either way."""
    model, pipe, x, y = _case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=M, loss_fn=loss_fn)
        lp.step(x, target=y)
    assert lp.schedules[-1].loss_reduction == reduction
    ref = _grads_after(model, loss_fn(model(x), y))
    for name, g in ref.items():
        torch.testing.assert_close(lp.named_grads()[name], g, rtol=0, atol=TOL)


def _norm_loss(out, target):
    return (out - target).norm()  # over the whole batch at once: neither a sum nor a mean of micro-batches


def test_a_reduction_the_measure_cannot_read_warns_and_averages_and_can_be_given() -> None:
    model, pipe, x, y = _case()
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=M, loss_fn=_norm_loss)
    with pytest.warns(UserWarning, match=r"cannot tell whether loss_fn '_norm_loss' sums or averages.*neither the same "
                                         r"nor double.*loss_reduction='sum'"):
        lp.step(x, target=y)
    assert lp.schedules[-1].loss_reduction == "mean"
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


def test_interleaved_with_one_stage_per_rank_runs_as_1f1b() -> None:
    """As in PyTorch's pipelining, one stage per rank is accepted: interleaving over one chunk is 1F1B."""
    model, pipe, x, y = _case()
    lp = LocalPipeline(pipe, ScheduleInterleaved1F1B, num_ranks=2, n_microbatches=M, loss_fn=torch.nn.MSELoss())
    assert [a.split() for a in str(lp.schedules[0].schedule).splitlines()[1:]] == \
        [a.split() for a in str(LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=M,
                                              loss_fn=torch.nn.MSELoss()).schedules[0].schedule).splitlines()[1:]]
    out = lp.step(x, target=y)
    want = _grads_after(model, F.mse_loss(model(x), y))
    torch.testing.assert_close(out, model(x), rtol=0, atol=TOL)
    for name, g in want.items():
        torch.testing.assert_close(lp.named_grads()[name], g, rtol=0, atol=TOL)


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


def test_the_measure_stacks_a_sequence_first_output_and_target_along_the_batch_dim() -> None:
    """Output and target ``[seq, batch, width]`` split along dim 1: the measure stacks both there, so a sum over
    the batch reads as a sum even though dim 0 (the sequence) would not split like it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4)).double()
    x, y = torch.randn(5, 8, 4, dtype=torch.float64), torch.randn(5, 8, 4, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), M, (x,), split_spec={"1": SplitPoint.END},
                    args_chunk_spec=(TensorChunkSpec(1),))

    def per_row_sum(out, target):  # sums the batch, averages each row's sequence: only dim 1 stacks as a sum
        return ((out - target) ** 2).mean(dim=(0, 2)).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=M, loss_fn=per_row_sum)
        lp.step(x, target=y)
    assert lp.schedules[-1].loss_reduction == "sum"
    ref = _grads_after(model, per_row_sum(model(x), y))
    for name, g in ref.items():
        torch.testing.assert_close(lp.named_grads()[name], g, rtol=0, atol=TOL)


def test_a_target_without_the_batch_dim_reaches_every_micro_batch_whole() -> None:
    """A ``[4]`` target for a batch of 8 rows broadcasts in the plain model's loss; split into micro-batches it
    would broadcast other values. Every micro-batch gets all of it; a batched or flattened target still splits."""
    model, pipe, x, _ = _case()
    row = torch.randn(4, dtype=torch.float64)
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=M, loss_fn=F.mse_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the target broadcasts, in both runs
        lp.step(x, target=row)
        ref = _grads_after(model, F.mse_loss(model(x), row))
    for name, g in ref.items():
        torch.testing.assert_close(lp.named_grads()[name], g, rtol=0, atol=TOL)
    flat = torch.randn(8 * 4, dtype=torch.float64)  # one value per output element, flattened: rows in order

    def flat_mse(out, target):
        return F.mse_loss(out.reshape(-1), target)

    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=M, loss_fn=flat_mse, loss_reduction="mean")
    lp.step(x, target=flat)
    ref = _grads_after(model, flat_mse(model(x), flat))
    for name, g in ref.items():
        torch.testing.assert_close(lp.named_grads()[name], g, rtol=0, atol=TOL)

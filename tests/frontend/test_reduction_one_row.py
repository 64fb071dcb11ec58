"""pippy.frontend.reduction on micro-batches of one row, where ``x.shape[0]`` is 1 and a count looks like a literal."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from models import gpt2
from test_reduction import LOSSES, LossNet, _data
from torch import nn

from pippy import Schedule1F1B, ScheduleGPipe, SplitPoint, pipe_split, pipeline
from pippy.frontend.trace import trace_count
from pippy.runtime.local import LocalPipeline


@pytest.mark.parametrize(("name", "loss", "kind"), LOSSES, ids=[c[0] for c in LOSSES])
def test_own_loss_reduction_on_one_row(name, loss, kind) -> None:
    """8 rows in 8 micro-batches: ``sum / x.shape[0]`` divides by 1 in the trace, and is still read as a mean."""
    torch.manual_seed(0)
    x, t = _data()
    pipe = pipeline(LossNet(loss).double(), 8, (x, t))
    assert pipe.output_reductions == [kind, None, "sum"], name


@pytest.mark.parametrize("cls", [ScheduleGPipe, Schedule1F1B], ids=lambda c: c.__name__)
@pytest.mark.parametrize(("batch", "chunks"), [(4, 4), (2, 2)])
@pytest.mark.parametrize(("name", "loss", "kind"), LOSSES[:6], ids=[c[0] for c in LOSSES[:6]])
def test_one_row_own_loss_grads_and_outputs_equal_the_plain_model(cls, batch, chunks, name, loss, kind) -> None:
    """Loss, outputs and every grad equal the plain model's; before, ``sum / x.shape[0]`` on one-row micro-batches
    was read as a sum, and loss and grads came out ``n_microbatches`` times too big, with no warning."""
    torch.manual_seed(0)
    model = LossNet(loss).double()
    ref = copy.deepcopy(model)
    x, t = (v[:batch] for v in _data())
    pipe = pipeline(model, chunks, (x, t))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reduction is known: no "cannot tell" warning
        lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=chunks)
    got = lp.step(x, t)
    want = ref(x, t)
    want["loss"].backward()
    for key in ("loss", "out", "total"):
        assert torch.allclose(got[key], want[key].detach(), atol=1e-12, rtol=0), key
    assert torch.allclose(pipe(x, t)[0], want["loss"].detach(), atol=1e-12, rtol=0)  # local call, whole batch
    grads = lp.named_grads()
    for n, p in ref.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-12, rtol=0), n


class _SeqLoss(nn.Module):
    """``sum / x.shape[0]`` over a sequence traced with a dynamic length."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        pipe_split()
        return (self.b(h) ** 2).sum() / x.shape[0]


def test_one_row_count_that_cannot_be_settled_warns_naming_the_fix() -> None:
    """A dynamic trace has no second trace to settle ``/ 1``: pipeline() says so and names ``loss_reduction=``,
    which then gives the plain model's loss and grads."""
    torch.manual_seed(0)
    model = _SeqLoss().double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="loss_reduction='mean' or 'sum'") as said:
        pipe = pipeline(copy.deepcopy(model), 4, (x,), dynamic_shapes={"x": {1: (2, 64)}})
    assert pipe.output_reductions == ["ambiguous"]
    assert any("one row" in str(w.message) for w in said)
    lp = LocalPipeline(pipe, ScheduleGPipe, num_ranks=2, n_microbatches=4, loss_reduction="mean")
    got = lp.step(x)
    want = model(x)
    want.backward()
    assert torch.allclose(got, want.detach(), atol=1e-12, rtol=0)
    for n, p in model.named_parameters():
        assert torch.allclose(lp.named_grads()[n], p.grad, atol=1e-12, rtol=0), n


def test_one_row_language_model_loss_needs_no_second_trace() -> None:
    """A loss op's own mean (GPT-2's cross entropy) divides by no int: one trace, as before."""
    x = torch.randint(0, 96, (4, 16))
    before = trace_count()
    pipe = pipeline(gpt2(n_layer=2), 4, (x,), {"labels": x}, split_spec={"transformer.h.0": SplitPoint.END})
    assert trace_count() - before == 1
    assert pipe.output_reductions is not None and pipe.output_reductions[0] == "mean"

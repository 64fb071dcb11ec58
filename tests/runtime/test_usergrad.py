"""pippy.runtime.usergrad: the user's inputs that require grad get the unpipelined model's ``.grad``."""

from __future__ import annotations

import copy

import pytest
import torch
from models import SkipNet, TwoInputs, mse
from test_local_schedules import SCHEDULES

from pippy import SplitPoint, pipeline
from pippy.runtime.local import LocalPipeline
from pippy.runtime.stage import StageError


def _batch(traced_grad: bool):
    g = torch.Generator().manual_seed(3)
    x, y, bias = (torch.randn(8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    bias = bias[:, :2].contiguous()
    if traced_grad:
        for t in (x, y, bias):
            t.requires_grad_(True)
    return x, y, bias


@pytest.mark.parametrize(("cls", "ranks"), SCHEDULES, ids=[f"{c.__name__}-{r}ranks" for c, r in SCHEDULES])
def test_input_grads_equal_the_plain_model(cls, ranks) -> None:
    """Every input requires grad, one of them read only by the last stage: all three grads are exact, and they
    accumulate over steps as autograd's do."""
    torch.manual_seed(0)
    model = TwoInputs().double()
    ref = copy.deepcopy(model)
    ex, ey, ebias = _batch(traced_grad=True)
    cuts = {"b": SplitPoint.END} if ranks == 2 else None  # four stages for the multi-stage schedules, else three
    pipe = pipeline(model, 4, (ex, ey), {"bias": ebias}, split_spec=cuts)
    lp = LocalPipeline(pipe, cls, num_ranks=min(ranks, pipe.num_stages), n_microbatches=4, loss_fn=mse)
    x, y, bias = _batch(traced_grad=True)
    rx, ry, rbias = (t.detach().clone().requires_grad_() for t in (x, y, bias))
    tgt = torch.randn(8, 2, dtype=torch.float64)
    for _ in range(2):
        lp.step(x, y, bias=bias, target=tgt)
        mse(ref(rx, ry, bias=rbias), tgt).backward()
    for got, want in ((x, rx), (y, ry), (bias, rbias)):
        assert got.grad is not None
        assert torch.allclose(got.grad, want.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("cls", "ranks"), SCHEDULES[:3] + SCHEDULES[-2:], ids=lambda v: getattr(v, "__name__", v))
def test_input_read_on_the_first_stage_only_needs_no_traced_grad(cls, ranks) -> None:
    """SkipNet reads its input on stage 0 only: traced without grad, the batch's grad is still exact."""
    torch.manual_seed(0)
    model = SkipNet(4).double()
    ref = copy.deepcopy(model)
    x = torch.randn(8, 8, dtype=torch.float64)
    pipe = pipeline(model, 4, (x,))
    lp = LocalPipeline(pipe, cls, num_ranks=ranks, n_microbatches=4, loss_fn=mse)
    xg, rx = x.clone().requires_grad_(), x.clone().requires_grad_()
    tgt = torch.randn(8, 3, dtype=torch.float64)
    lp.step(xg, target=tgt)
    mse(ref(rx), tgt).backward()
    assert xg.grad is not None and torch.allclose(xg.grad, rx.grad, atol=1e-12, rtol=0)
    lp.eval(xg)  # eval leaves the grad alone
    assert torch.allclose(xg.grad, rx.grad, atol=1e-12, rtol=0)


def test_input_passed_on_without_a_traced_grad_is_refused() -> None:
    """TwoInputs passes ``bias`` on to the last stage: traced without grad, its grad could not come back, so the
    step says so (stage, micro-batch, the input, how to fix) instead of filling a partial grad."""
    torch.manual_seed(0)
    x, y, bias = _batch(traced_grad=False)
    pipe = pipeline(TwoInputs().double(), 4, (x, y), {"bias": bias})
    lp = LocalPipeline(pipe, SCHEDULES[1][0], num_ranks=3, n_microbatches=4, loss_fn=mse)
    with pytest.raises(StageError) as err:
        lp.step(x, y, bias=bias.clone().requires_grad_(), target=torch.randn(8, 2, dtype=torch.float64))
    msg = str(err.value)
    assert "stage 0, micro-batch 0" in msg and "bias requires grad" in msg
    assert "example_args=(x.requires_grad_(),)" in msg
    lp.step(x, y, bias=bias, target=torch.randn(8, 2, dtype=torch.float64))  # a batch without grad still runs

"""clip_grad_norm_ over the pipelined model equals torch.nn.utils.clip_grad_norm_ on the plain model (tied weights once)."""

from __future__ import annotations

import copy

import pytest
import torch
from models import gpt2, lm_loss

import pippy
from pippy import SplitPoint, pipeline
from pippy.runtime.local import LocalPipeline

TOL = 1e-12


def _step(mode: str):
    torch.manual_seed(0)
    model = gpt2(n_layer=2).double()
    ref = copy.deepcopy(model)
    x, y = torch.randint(0, 96, (4, 16)), torch.randint(0, 96, (4, 16))
    lm_loss(ref(x), y).backward()
    pipe = pipeline(model, 2, (x,), split_spec={"transformer.h.0": SplitPoint.END}, tied_weights=mode)
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=lm_loss)
    lp.step(x, target=y)
    return ref, lp


@pytest.mark.parametrize("mode", ["replicate", "transmit"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_global_norm_and_scaling_equal_the_plain_model(mode: str, norm_type: float) -> None:
    ref, lp = _step(mode)
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=0.05, norm_type=norm_type)
    got = pippy.clip_grad_norm_(lp.stages, max_norm=0.05, norm_type=norm_type)
    assert float(want) > 0.05  # it really clips
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-12, atol=0)
    grads = lp.named_grads()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=TOL, msg=name)
    if mode == "replicate":  # both copies of the tied weight were scaled alike
        head = lp.stages[1].submod.get_parameter("lm_head.weight").grad
        torch.testing.assert_close(head, grads["transformer.wte.weight"], rtol=0, atol=TOL)


def test_no_clip_below_max_norm_and_one_stage_alone() -> None:
    ref, lp = _step("replicate")
    before = {n: g.clone() for n, g in lp.named_grads().items()}
    total = pippy.clip_grad_norm_(lp.stages, max_norm=1e9)
    assert all(torch.equal(before[n], g) for n, g in lp.named_grads().items())
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).double(),
                               rtol=1e-12, atol=0)
    assert float(pippy.grad_norm(lp.stages[0])) < float(total)  # one stage alone sees part of the norm


def test_nonfinite_and_bad_input() -> None:
    _, lp = _step("replicate")
    next(iter(lp.stages[1].parameters())).grad.view(-1)[0] = float("nan")
    with pytest.raises(RuntimeError, match=r"clip_grad_norm_: the total norm .* is nan"):
        pippy.clip_grad_norm_(lp.stages, 1.0, error_if_nonfinite=True)
    with pytest.raises(TypeError, match=r"stages\[0\] is Linear, expected a runtime stage"):
        pippy.clip_grad_norm_([torch.nn.Linear(2, 2)], 1.0)
    with pytest.raises(ValueError, match="no stage given"):
        pippy.clip_grad_norm_([], 1.0)


class _Complex(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w0 = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.complex128) * 0.3)
        self.w1 = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.complex128) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w0
        pippy.pipe_split()
        return h @ self.w1


def _abs_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).abs().pow(2).mean()


_abs_mse.reduction = "mean"  # type: ignore[attr-defined]


def test_complex_gradients_clip_like_torch() -> None:
    """A complex gradient's norm is real (pippy returned a complex norm and clipping crashed in clamp)."""
    torch.manual_seed(0)
    model = _Complex()
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 8, dtype=torch.complex128), torch.randn(8, 8, dtype=torch.complex128)
    _abs_mse(ref(x), y).backward()
    lp = LocalPipeline(pipeline(model, 4, (x,)), pippy.Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=_abs_mse)
    lp.step(x, target=y)
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=0.01)
    got = pippy.clip_grad_norm_(lp.stages, max_norm=0.01)
    assert got.dtype == torch.float64 and float(want) > 0.01
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    grads = lp.named_grads()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=TOL, msg=name)

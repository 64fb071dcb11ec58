"""A region call keeps only its inputs; ops after it keep its recipe; the rebuild runs once per backward."""

from __future__ import annotations

import torch
from torch import fx, nn

from pippy.frontend.regioncall import RegionCall, keep_recipes


class _Counted:
    """A region (exp then tanh) that counts its runs."""

    def __init__(self) -> None:
        self.runs = 0
        self.gm = fx.symbolic_trace(lambda x, s: (torch.tanh(torch.exp(x) * s),))

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.runs += 1
        return self.gm(*args)  # type: ignore[no-any-return]


def _saved(fn: object) -> tuple[int, object]:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        seen[id(base)] = base.numel() * base.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()  # type: ignore[operator]
    return sum(seen.values()), out


def test_a_matmul_after_the_region_keeps_its_recipe_and_the_region_runs_once_in_backward() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    s = torch.rand(32, dtype=torch.float64) + 0.5
    w = torch.randn(32, 8, dtype=torch.float64, requires_grad=True)
    region = _Counted()
    call = RegionCall(region, "exp, mul, tanh")

    def run() -> torch.Tensor:
        with keep_recipes():  # the outer counting hooks still see every other saved tensor
            out = call(x, s)[0]
            return (out @ w).sum() + (out[:, :16] @ w[:16]).sum()  # the output, and a view of it

    kept, y = _saved(run)
    def ref() -> torch.Tensor:
        out = torch.tanh(torch.exp(x) * s)
        return (out @ w).sum() + (out[:, :16] @ w[:16]).sum()

    plain, y_ref = _saved(ref)
    # x, s and w only: neither exp's nor tanh's output, nor the matmuls' inputs (the output and a view of it)
    assert kept == 8 * (x.numel() + s.numel() + w.numel()) and plain == kept - 8 * x.numel() + 2 * 8 * x.numel()
    assert region.runs == 1
    y.backward()  # type: ignore[union-attr]
    assert region.runs == 2  # the matmul's backward rebuilt the region; the region's own backward reused it
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y_ref.backward()  # type: ignore[union-attr]
    assert torch.equal(y, y_ref) and torch.equal(gx, x.grad) and torch.equal(gw, w.grad)


def test_a_region_reading_a_parameter_hands_out_no_recipe() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    scale = nn.Parameter(torch.rand(3))
    call = RegionCall(_Counted(), "exp, mul, tanh")
    out = call(x, scale)[0]
    assert not hasattr(out, "_pippy_region_recipe")  # FSDP2 may have freed the parameter when a later op rebuilds
    assert hasattr(call(x, scale.detach())[0], "_pippy_region_recipe")


def test_without_grad_the_region_runs_plainly() -> None:
    region = _Counted()
    with torch.no_grad():
        out = RegionCall(region, "r")(torch.ones(2), torch.ones(2))[0]
    assert out.grad_fn is None and region.runs == 1 and not hasattr(out, "_pippy_region_recipe")

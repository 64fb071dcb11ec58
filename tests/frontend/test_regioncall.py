"""A region call keeps only its inputs; ops after it keep its recipe; the rebuild runs once per backward."""

from __future__ import annotations

import weakref

import torch
from torch import fx, nn

from pippy.frontend.regioncall import RegionCall, keep_recipes
from pippy.sim.memory import SavedBytes


class _Counted:
    """A region (exp then tanh) that counts its runs."""

    def __init__(self) -> None:
        self.runs = 0
        self.gm = fx.symbolic_trace(lambda x, s: (torch.tanh(torch.exp(x) * s),))

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.runs += 1
        return self.gm(*args)  # type: ignore[no-any-return]


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

    with SavedBytes() as kept:
        y = run()
    def ref() -> torch.Tensor:
        out = torch.tanh(torch.exp(x) * s)
        return (out @ w).sum() + (out[:, :16] @ w[:16]).sum()

    with SavedBytes() as plain:
        y_ref = ref()
    # x, s and w only: neither exp's nor tanh's output, nor the matmuls' inputs (the output and a view of it)
    assert kept.total == 8 * (x.numel() + s.numel() + w.numel())
    assert plain.total == kept.total + 8 * x.numel()  # exp's and tanh's outputs where kept has x
    assert region.runs == 1
    y.backward()
    assert region.runs == 2  # the matmul's backward rebuilt the region; the region's own backward reused it
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y_ref.backward()
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


def test_a_forward_dropped_without_backward_frees_what_it_saved() -> None:
    x = torch.randn(8, requires_grad=True)
    with keep_recipes():
        y = torch.tanh(x)  # tanh saves its own output: kept as a detached alias, not in a cycle with its node
    gone = weakref.ref(y)
    del y
    assert gone() is None

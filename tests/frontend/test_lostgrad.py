"""Forward code whose backward a trace loses (custom autograd Functions, reentrant checkpoints, tensor hooks) is
refused for training; torch.library custom ops keep their backward; backward hooks on the model are named."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pippy import Schedule1F1B, ScheduleZBH1, pipe_split, pipeline
from pippy.runtime.local import LocalPipeline
from pippy.runtime.stage import StageError


class Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return -0.5 * g


reverse = Reverse.apply  # bound before any trace (flash-attn, apex and gradient-reversal layers write it so)


@torch.library.custom_op("pippytest::reverse", mutates_args=())
def reverse_op(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@reverse_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


reverse_op.register_autograd(lambda ctx, g: -0.5 * g)


class Net(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.l1, self.l2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.fn = Reverse.apply

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        pipe_split()
        if self.kind == "function":
            h = Reverse.apply(h)
        elif self.kind == "alias":
            h = reverse(h)
        elif self.kind == "attribute":
            h = self.fn(h)
        elif self.kind == "custom_op":
            h = reverse_op(h)
        elif self.kind == "hook" and h.requires_grad:
            h.register_hook(lambda g: g * 0.25)
        elif self.kind == "reentrant":
            h = checkpoint(self.l2, h, use_reentrant=True)
        return self.head(torch.tanh(self.l2(h)))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)


@pytest.mark.parametrize("kind,named", [
    ("function", r"custom torch.autograd.Function Reverse .*Reverse.apply at .*test_lostgrad.py:\d+"),
    ("alias", r"custom torch.autograd.Function Reverse .*Reverse.apply at .*test_lostgrad.py:\d+"),  # trained silently
    ("attribute", r"custom torch.autograd.Function Reverse .*Reverse.apply at .*test_lostgrad.py:\d+"),  # wrong before
    ("hook", r"a tensor hook registered in forward \(.*\) at .*test_lostgrad.py:\d+"),
    ("reentrant", r"torch.utils.checkpoint\(use_reentrant=True\) at .*test_lostgrad.py:\d+"),
])
def test_lost_backward_is_refused_for_training(kind: str, named: str) -> None:
    torch.manual_seed(0)
    model = Net(kind).double()
    x, _ = _data()
    with pytest.warns(UserWarning, match=f"pipeline\\(\\): forward uses {named}.*training schedules refuse"):
        pipe = pipeline(copy.deepcopy(model), 4, (x,))
    with pytest.raises(StageError, match=f"Schedule1F1B: the model's forward uses {named}.*How to fix: .*custom_op"):
        LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=F.mse_loss)
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4)  # forward only: allowed, and exact
    with torch.no_grad():
        torch.testing.assert_close(lp.eval(x), model(x), rtol=0, atol=1e-13)


@pytest.mark.parametrize("cls", [Schedule1F1B, ScheduleZBH1])
def test_custom_op_keeps_its_backward(cls: type) -> None:
    torch.manual_seed(0)
    model = Net("custom_op").double()
    _trains_exactly(model, cls)
    assert model.l1.weight.grad is not None and model.l1.weight.grad.abs().sum() > 0


def _trains_exactly(model: nn.Module, cls: type) -> None:
    """Traced without a warning, one pipelined step gives every grad of the plain model's step (which it takes)."""
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = pipeline(copy.deepcopy(model), 4, (x,))
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=4, loss_fn=F.mse_loss)
    lp.step(x, target=y)
    F.mse_loss(model(x), y).backward()
    grads = lp.named_grads()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-13)


def test_model_backward_hooks_are_named() -> None:
    model = Net("plain").double()
    model.l1.weight.register_hook(lambda g: g * 2)
    model.head.register_full_backward_hook(lambda m, gi, go: None)
    with pytest.warns(UserWarning, match=r"backward hooks on module head, parameter l1.weight stay on the model"):
        pipeline(model, 2, (_data()[0],))


class SplitAfterReentrant(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.l1, x, use_reentrant=True)
        pipe_split()
        return self.head(torch.tanh(self.l2(h)))


def test_split_after_a_reentrant_checkpoint_names_it() -> None:
    with pytest.raises(Exception, match=r"pipe_split\(\) at .* follows torch.utils.checkpoint\(use_reentrant=True\) at "
                                        r".*test_lostgrad.py:\d+.*Expected use_reentrant=False"):
        pipeline(SplitAfterReentrant("plain").double(), 2, (_data()[0],))


class Identity(torch.autograd.Function):
    """A Function whose backward is autograd's of its forward: it says so, and trains."""

    pippy_traced_backward_ok = True

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x * 2

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g * 2


class OptedOut(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        pipe_split()
        return self.head(torch.tanh(self.l2(Identity.apply(h))))


def test_a_function_may_say_its_backward_is_autograds() -> None:
    torch.manual_seed(0)
    _trains_exactly(OptedOut("plain").double(), Schedule1F1B)
    assert torch.autograd.Function.__dict__["apply"].__func__.__name__ == "apply"  # unpatched after the trace


class NoGradUses(Net):
    """A library's inference path calls forward itself, and a Function applied to what needs no grad has no backward
    to lose: neither is refused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        pipe_split()
        with torch.no_grad():
            h = h + Reverse.forward(None, h.detach()) * 0  # type: ignore[arg-type]
        h = h + Reverse.apply(torch.ones_like(h) * 0.5)
        return self.head(torch.tanh(self.l2(h)))


def test_functions_without_a_backward_to_lose_are_not_refused() -> None:
    torch.manual_seed(0)
    _trains_exactly(NoGradUses("plain").double(), Schedule1F1B)

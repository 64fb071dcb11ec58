"""Split backward on GroupNorm over channels_last inputs: exact, and never torch's crashing backward to the weights alone.

``torch.autograd.grad(gn(x_channels_last), [gn.weight])`` segfaults (torch's own bug): its input's gradient unasked,
``native_group_norm_backward`` crashes the process. A guard mode raises before such a call reaches the kernel, so a
regression fails these tests instead of killing pytest.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from models import mse
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pippy
from pippy import SplitPoint, pipeline
from pippy.runtime.local import LocalPipeline

CL = torch.channels_last


class NoWeightOnlyGroupNormBackward(TorchDispatchMode):
    """Raises where torch would crash: a group norm backward on a channels_last input, its input's gradient unasked."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.native_group_norm_backward.default:
            self.calls += 1
            x, mask = args[1], args[-1]
            if not mask[0] and x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=CL):
                raise RuntimeError("native_group_norm_backward to the weights alone on a channels_last input")
        return func(*args, **(kwargs or {}))


class Block(nn.Module):
    """A ResNet basic block with GroupNorm: ReLU(inplace) after the first norm, ``out += identity`` after the second."""

    def __init__(self, c: int = 4, frozen: str = "") -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(2, c)
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(2, c)
        self.relu = nn.ReLU(inplace=True)
        for n in (self.n1, self.n2):
            if frozen:
                getattr(n, frozen).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.n1(self.c1(x)))
        y = self.n2(self.c2(y))
        y += x
        return self.relu(y)


class GNNet(nn.Module):
    """Blocks then a Linear head; ``frozen``: "bias" or "weight" of every norm frozen."""

    def __init__(self, n: int = 4, frozen: str = "") -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(frozen=frozen) for _ in range(n)])
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


class SharedMix(nn.Module):
    """A GroupNorm on what it receives (copied to channels_last: a received activation arrives contiguous), then
    one 1x1 conv applied twice (its weight has two readers)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.mix = nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.tanh(self.mix(self.norm(torch.clone(x, memory_format=CL)))))


SCHEDULES = [("ScheduleZBH1", 2), ("ScheduleZBV", 4), ("ScheduleDualPipeV", 4)]


def _step(model: nn.Module, cls: str, n_stages: int, split: dict[str, SplitPoint], ranks: int = 2) -> LocalPipeline:
    torch.manual_seed(1)
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=CL)
    y = torch.randn(8, 4, dtype=torch.float64)
    ref = copy.deepcopy(model)
    pipe = pipeline(model, 4, (x,), split_spec=split)
    assert pipe.num_stages == n_stages
    lp = LocalPipeline(pipe, getattr(pippy, cls), num_ranks=ranks, n_microbatches=4, loss_fn=mse)
    losses: list[torch.Tensor] = []
    with NoWeightOnlyGroupNormBackward():
        out = lp.step(x, target=y, losses=losses)
    want = ref(x)
    loss = mse(want, y)
    loss.backward()
    torch.testing.assert_close(out, want, rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.stack(losses).mean(), loss.detach(), rtol=0, atol=1e-13)
    grads = lp.named_grads()
    for name, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-13, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert grads.get(name) is None, name
    return lp


def _blocks_split(n_stages: int) -> dict[str, SplitPoint]:
    return {f"blocks.{i}": SplitPoint.END for i in range(n_stages - 1)}


def test_guard_intercepts_the_crashing_call() -> None:
    """The guard sees torch's crashing call before its kernel runs (else these tests could not fail safely)."""
    gn = nn.GroupNorm(2, 4).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    y = gn(x)
    with NoWeightOnlyGroupNormBackward(), pytest.raises(RuntimeError, match="weights alone"):
        torch.autograd.grad(y, [gn.weight], torch.ones_like(y))


@pytest.mark.parametrize(("cls", "n_stages"), SCHEDULES)
@pytest.mark.parametrize("frozen", ["", "bias", "weight"])
def test_group_norm_written_in_place_or_frozen_keeps_its_closed_form(cls: str, n_stages: int, frozen: str) -> None:
    """``out += identity`` and ReLU(inplace) after the norms, and a frozen bias or weight: every norm still has its
    closed form (its gradient taken at the edge recorded right after it), exact against the plain model."""
    lp = _step(GNNet(frozen=frozen).double().to(memory_format=CL), cls, n_stages, _blocks_split(n_stages))
    for st in lp.stages:
        kinds = [f.kind for f in st.taps.forms if f is not None]
        assert st.taps.exact and kinds.count("group_norm") == 2 * len(_block_names(st)), (st.index, kinds)


def _block_names(st: Any) -> set[str]:
    return {".".join(n.split(".")[:2]) for n, _ in st.submod.named_parameters() if n.startswith("blocks.")}


@pytest.mark.parametrize(("cls", "ranks", "n_stages"), [("ScheduleZBH1", 3, 3), ("ScheduleZBV", 2, 4),
                                                    ("ScheduleDualPipeV", 2, 4)])
def test_group_norm_in_a_stage_without_per_op_taps(cls: str, ranks: int, n_stages: int) -> None:
    """Stage 1 (a conv read twice) takes one W backward from its outputs, and its GroupNorm reads the received
    activation only: that backward asks for the stage inputs' gradients too, else torch crashes."""
    model = GNNet().double()
    model.blocks[1] = SharedMix().double()
    model = model.to(memory_format=CL)
    lp = _step(model, cls, n_stages, _blocks_split(n_stages), ranks=ranks)
    assert not next(s for s in lp.stages if s.index == 1).taps.exact

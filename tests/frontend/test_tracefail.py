"""A trace failure's diagnosis tells apart inputs the model cannot run on, a path only the trace's settings take, and
code that cannot be traced, and advises on each."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pippy import PipeTraceError, pipeline


class _OtherPathWithoutCache(nn.Module):
    """Like FSMT: with ``use_cache`` off (as pippy traces) forward builds its masks itself, on a data-dependent
    branch, and then overflows eagerly; as the user calls it (``use_cache`` on) it runs."""

    def __init__(self, needs_mask: bool = False) -> None:
        super().__init__()
        self.config = SimpleNamespace(use_cache=True)
        self.lin = nn.Linear(3, 3)
        self.needs_mask = needs_mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.needs_mask:
            x = x * mask[:, None]  # type: ignore[index]
        if self.config.use_cache:
            return self.lin(x)
        if not (x == 0).any():  # the trace stops here
            x = x + 1
        return self.lin(x) + torch.full_like(x, 1e300, dtype=torch.float32)  # eagerly: overflow


def test_a_forward_failing_only_with_use_cache_off_is_not_blamed_on_the_inputs() -> None:
    model = _OtherPathWithoutCache()
    x = torch.ones(4, 3)
    model(x)  # runs as the user calls it
    with pytest.raises(PipeTraceError) as info:
        pipeline(model, 2, (x,))
    msg = str(info.value)
    assert "inputs are the problem" not in msg
    assert "_OtherPathWithoutCache runs eagerly on these inputs as you call it, but pippy traces it with " \
           "config.use_cache=False" in msg
    assert "fails eagerly too (it raised RuntimeError: value cannot be converted to type float without overflow)" in msg
    # the trace's own failure, with its line and its kind
    assert "GuardOnDataDependentSymNode" in msg and "if not (x == 0).any():" in msg
    assert "data-dependent control flow" in msg and "model(..., use_cache=False)" in msg
    assert model.config.use_cache is True


def test_a_forward_failing_as_called_too_still_blames_the_inputs() -> None:
    model = _OtherPathWithoutCache(needs_mask=True)
    with pytest.raises(PipeTraceError, match=r"fails on these inputs when run eagerly too.*inputs are the problem"
                                             r".*TypeError.*leaves at None: mask;.*How to fix: pass what forward needs"):
        pipeline(model, 2, (torch.ones(4, 3),))
    assert model.config.use_cache is True


class _CastsItself(nn.Module):
    """Like Switch Transformers' router: forward casts its own layer to the dtype it computes in."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.classifier = nn.Linear(3, 3), nn.Linear(3, 3)
        self.cast_in_forward = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cast_in_forward:
            self.classifier = self.classifier.to(torch.float32)
        return self.classifier(self.pre(x).float()).to(x.dtype)


def test_a_module_converted_in_forward_is_named_with_the_conversion_before_pipeline_as_fix() -> None:
    model = _CastsItself().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    for _ in range(2):  # the second time the cast changes nothing, and still cannot be traced
        with pytest.raises(PipeTraceError) as info:
            pipeline(model, 2, (x,))
        msg = str(info.value)
        assert "Couldn't swap" in msg and "self.classifier = self.classifier.to(torch.float32)" in msg
        assert "forward changes a module's parameters" in msg and "not data-dependent control flow" in msg
        assert "convert the module once, before pipeline(), and take the conversion out of forward" in msg
        assert "data-dependent control flow:" not in msg and "router" not in msg
        model.classifier.float()
    model.cast_in_forward = False  # the fix
    assert torch.equal(pipeline(model, 2, (x,))(x)[0], model(x))


class _ExpertLoop(nn.Module):
    """A mixture-of-experts layer written like transformers' eager experts, in a class without its loop-free
    variants (as Switch Transformers', NLLB-MoE's and DBRX's)."""

    def __init__(self) -> None:
        super().__init__()
        self.router, self.experts = nn.Linear(3, 4), nn.ModuleList(nn.Linear(3, 3) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = torch.nn.functional.one_hot(self.router(x).argmax(-1), 4)
        expert_hit = torch.greater(chosen.sum(0), 0).nonzero()
        out = torch.zeros_like(x)
        for expert_idx in expert_hit:
            out = out + self.experts[int(expert_idx)](x) * chosen[:, expert_idx]
        return out


def test_an_experts_loop_without_a_loop_free_variant_says_so() -> None:
    with pytest.raises(PipeTraceError) as info:
        pipeline(_ExpertLoop(), 2, (torch.randn(4, 3),))
    msg = str(info.value)
    assert "for expert_idx in expert_hit:" in msg and "mixture-of-experts loop over the experts" in msg
    assert "This model's experts take no experts_implementation" in msg and "make forward traceable" in msg

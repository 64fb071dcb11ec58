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

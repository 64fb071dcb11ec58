"""Activation recompute per stage: keep only a stage's inputs in forward, recompute its activations in backward.

    >>> # stage = pipe.build_stage(rank, "cpu"); enable_recompute(stage)
"""

from __future__ import annotations

from typing import Any

import torch.utils.checkpoint
from torch import nn

from pippy.runtime.stage import PipelineStage

__all__ = ["disable_recompute", "enable_recompute"]

_ORIG = "_pippy_forward_without_recompute"


def enable_recompute(stage: PipelineStage | nn.Module) -> None:
    """Run the stage module under non-reentrant ``torch.utils.checkpoint`` (same numbers, less memory).

    Parameter names, ``state_dict`` and gradients are unchanged; float64 results are bitwise equal
    to running without recompute. Applies to full backward (B); a split-backward schedule (I/W)
    runs the stage's tapped copy and stores activations as before.

        >>> import torch
        >>> lin = torch.nn.Linear(2, 2); enable_recompute(lin); lin(torch.ones(1, 2)).shape
        torch.Size([1, 2])
    """
    mod = stage.submod if isinstance(stage, PipelineStage) else stage
    if _ORIG in mod.__dict__:
        return
    inner = mod.forward
    mod.__dict__[_ORIG] = inner

    def forward(*args: Any) -> Any:
        if not torch.is_grad_enabled():
            return inner(*args)
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False)

    mod.forward = forward  # type: ignore[method-assign]


def disable_recompute(stage: PipelineStage | nn.Module) -> None:
    """Undo :func:`enable_recompute`."""
    mod = stage.submod if isinstance(stage, PipelineStage) else stage
    if _ORIG in mod.__dict__:
        mod.__dict__.pop(_ORIG)
        mod.__dict__.pop("forward", None)

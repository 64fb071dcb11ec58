"""Activation recompute per stage: keep only a stage's inputs in forward, recompute its activations in backward.

    >>> import torch
    >>> lin = torch.nn.Linear(2, 2)
    >>> x = torch.ones(1, 2)
    >>> plain = lin(x)
    >>> enable_recompute(lin)
    >>> torch.equal(lin(x), plain), is_recomputing(lin)
    (True, True)
    >>> disable_recompute(lin); is_recomputing(lin)
    False
"""

from __future__ import annotations

from typing import Any

import torch.utils.checkpoint
from torch import nn

from pippy.frontend.materialize import HoldsModule

__all__ = ["disable_recompute", "enable_recompute", "is_recomputing"]

_ORIG = "_pippy_forward_without_recompute"


def _module(stage: HoldsModule | nn.Module) -> nn.Module:
    return stage.submod if isinstance(stage, HoldsModule) else stage


def enable_recompute(stage: HoldsModule | nn.Module) -> None:
    """Run a stage's module (or any module) under non-reentrant ``torch.utils.checkpoint``: same numbers, less memory.

    Parameter names, ``state_dict`` and gradients are unchanged; float64 results are bitwise equal
    to running without recompute. Applies to full backward (B); a split-backward schedule (I/W)
    runs the stage's tapped copy and stores activations as before.

        >>> lin = torch.nn.Linear(2, 2); enable_recompute(lin); lin(torch.ones(1, 2)).shape
        torch.Size([1, 2])
    """
    mod = _module(stage)
    if _ORIG in mod.__dict__:
        return
    inner = mod.forward
    mod.__dict__[_ORIG] = inner

    def forward(*args: Any) -> Any:
        if not torch.is_grad_enabled():
            return inner(*args)
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False)

    mod.forward = forward  # type: ignore[method-assign]


def disable_recompute(stage: HoldsModule | nn.Module) -> None:
    """Undo :func:`enable_recompute`.

        >>> lin = torch.nn.Linear(2, 2); enable_recompute(lin); disable_recompute(lin)
        >>> is_recomputing(lin)
        False
    """
    mod = _module(stage)
    if _ORIG in mod.__dict__:
        mod.__dict__.pop(_ORIG)
        mod.__dict__.pop("forward", None)


def is_recomputing(stage: HoldsModule | nn.Module) -> bool:
    """Whether :func:`enable_recompute` is in force on this stage (or module).

        >>> is_recomputing(torch.nn.Linear(1, 1))
        False
    """
    return _ORIG in _module(stage).__dict__

"""DDP beside the pipeline: one gradient all-reduce per stage per step, in the stage's last backward.

DDP decides in *forward* whether the next backward all-reduces, which does not fit a pipeline:
under 1F1B the last forward of a step is followed by the backwards of earlier micro-batches. So
every forward of a step runs with DDP's sync off (gradients accumulate locally), and right before
the stage's last backward of the step pippy arms DDP's reducer, so that backward all-reduces the
accumulated gradients once. Works for a stage module wrapped in ``DistributedDataParallel`` and
for torch's composable ``replicate`` (which keeps the original parameter names).

    >>> import torch
    >>> DdpSync.find(torch.nn.Linear(2, 2)) is None   # not data parallel: nothing to do
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DdpSync"]


def _replicate_state(module: nn.Module) -> Any:
    try:
        from torch.distributed._composable.replicate import replicate
    except ImportError:  # pragma: no cover - torch without composable replicate
        return None
    try:
        return replicate.state(module)
    except (AttributeError, KeyError, TypeError):
        return None


class DdpSync:
    """Gradient sync control of one DDP (or ``replicate``) stage module for one pipeline step."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.wrapped = isinstance(module, DistributedDataParallel)

    @staticmethod
    def find(module: nn.Module) -> DdpSync | None:
        """A controller for ``module`` if it is data parallel through DDP or ``replicate``, else None."""
        if isinstance(module, DistributedDataParallel) or _replicate_state(module) is not None:
            return DdpSync(module)
        return None

    def ddp(self) -> DistributedDataParallel:
        """The DDP object doing the reduction (``replicate`` builds it at its first forward)."""
        if self.wrapped:
            return self.module  # type: ignore[return-value]
        ddp = getattr(_replicate_state(self.module), "_ddp", None)
        if ddp is None:
            raise RuntimeError("replicate() has not built its DDP reducer yet: no forward ran on this stage")
        return ddp

    def start(self) -> None:
        """Before the step's first forward: forwards leave DDP's reducer unarmed (no all-reduce per micro-batch)."""
        self._sync(False)

    def last_backward(self, outputs: Iterable[Any]) -> None:
        """Right before the stage's last backward of the step: that backward all-reduces, once."""
        ddp = self.ddp()
        ddp.require_backward_grad_sync = True
        found = [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
        ddp.reducer.prepare_for_backward(found if ddp.find_unused_parameters else [])

    def finish(self) -> None:
        """After the step (or a failed one): DDP syncs again, as for a plain ``module(x).backward()``."""
        self._sync(True)

    def _sync(self, on: bool) -> None:
        if self.wrapped:
            self.module.require_backward_grad_sync = on
        else:
            self.module.set_requires_gradient_sync(on)  # type: ignore[operator]

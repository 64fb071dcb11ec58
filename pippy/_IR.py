"""PiPPy's private module path of its pipe IR (``from pippy._IR import Pipe, pipeline, ...``), kept for old scripts.

    >>> import torch
    >>> from pippy._IR import PipeSequential, pipeline
    >>> seq = PipeSequential.from_sequential(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    >>> pipeline(seq, 1, (torch.ones(1, 2),)).num_stages
    2
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

import torch
from torch import nn

from pippy._backward import _null_coalesce_accumulate
from pippy.frontend.trace import SplitPoint, annotate_split_points, pipe_split
from pippy.ModelSplit import aten_pipe_split_alias
from pippy.pipe import ArgsChunkSpec, KwargsChunkSpec, Pipe, pipeline

__all__ = [
    "ArgsChunkSpec",
    "KwargsChunkSpec",
    "LossWrapper",
    "MultiUseParameterConfig",
    "Pipe",
    "PipeSequential",
    "PipeSplitWrapper",
    "SplitPoint",
    "TrivialLossWrapper",
    "_null_coalesce_accumulate",
    "annotate_split_points",
    "aten_pipe_split_alias",
    "pipe_split",
    "pipeline",
]


class MultiUseParameterConfig(Enum):
    """How a parameter read by several stages is kept: pippy's ``pipeline(..., tied_weights="replicate"|"transmit")``."""

    TRANSMIT = 1
    REPLICATE = 2


class PipeSplitWrapper:
    """Holds ``SplitPoint`` under PiPPy's old spelling ``PipeSplitWrapper.SplitPoint.BEGINNING``."""

    SplitPoint = SplitPoint


class PipeSequential(nn.Sequential):  # type: ignore[misc]  # torch is untyped to mypy here
    """An ``nn.Sequential`` with a split point between every two children (one stage per child)."""

    @staticmethod
    def from_sequential(sequential_instance: nn.Sequential) -> PipeSequential:
        """The same children (shared, not copied), split between each."""
        return PipeSequential(*sequential_instance)

    def forward(self, input: Any) -> Any:
        """Run the children in order with ``pipe_split()`` between them."""
        for i, module in enumerate(self):
            if i > 0:
                pipe_split()
            input = module(input)
        return input


class LossWrapper(nn.Module):  # type: ignore[misc]
    """A model and its loss in one module; subclass it and write ``forward`` to return the loss.

        >>> class MyLoss(LossWrapper):
        ...     def forward(self, x, y):
        ...         return self.loss_fn(self.module(x), y)
        >>> float(MyLoss(torch.nn.Identity(), torch.nn.functional.l1_loss)(torch.ones(2), torch.zeros(2)))
        1.0
    """

    def __init__(self, module: nn.Module, loss_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Subclasses compute the loss here."""
        raise NotImplementedError("subclass LossWrapper and write forward(...) returning the loss")


class TrivialLossWrapper(LossWrapper):
    """``loss_fn(module(x), targets)``: a model that returns its own loss, ready for ``step()`` without ``loss_fn``."""

    def forward(self, x: Any, targets: Any) -> torch.Tensor:
        """The loss of ``module(x)`` against ``targets``."""
        return self.loss_fn(self.module(x), targets)

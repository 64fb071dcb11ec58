"""Chunk specs: how one input is split into micro-batches and how one output merges back.

    >>> TensorChunkSpec(1), Replicate(), Sum(mean=True)
    (TensorChunkSpec(dim=1), Replicate(), Sum(mean=True))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ChunkSpec", "Replicate", "Sum", "TensorChunkSpec", "sum_reducer"]


@dataclass(frozen=True, slots=True)
class TensorChunkSpec:
    """Split (and merge) a tensor along ``dim``.

        >>> TensorChunkSpec(1)
        TensorChunkSpec(dim=1)
    """

    dim: int = 0

    @property
    def split_dim(self) -> int:
        """PiPPy's name for ``dim``."""
        return self.dim


@dataclass(frozen=True, slots=True)
class Replicate:
    """Give every micro-batch the whole value (and merge by taking the first micro-batch's)."""


@dataclass(frozen=True, slots=True)
class Sum:
    """Merge a per-micro-batch value by summing (``mean=True`` averages instead).

        >>> Sum(mean=True)
        Sum(mean=True)
    """

    mean: bool = False


@dataclass(frozen=True, slots=True)
class _CustomReducer:
    """PiPPy's merge spec that folds the micro-batch values with ``reduce_fn``, starting from ``init_value``.

        >>> from pippy.microbatch import merge_chunks
        >>> merge_chunks([torch.tensor(1.0), torch.tensor(2.0)], sum_reducer)
        tensor(3.)
    """

    init_value: Any
    reduce_fn: Any


sum_reducer = _CustomReducer(torch.tensor(0.0), lambda a, b: a + b)
"""PiPPy's spec that sums micro-batch values (e.g. losses) on merge."""

ChunkSpec = TensorChunkSpec | Replicate | Sum | _CustomReducer
_Replicate = Replicate  # PiPPy's name; the class itself is accepted as a spec, as PiPPy wrote it
_SPEC_TYPES = (TensorChunkSpec, Replicate, Sum, _CustomReducer)


def _norm_spec(spec: Any) -> Any:
    """Ours for a spec class or PyTorch pipelining's spec (read by name, never imported).

        >>> _norm_spec(Replicate), _norm_spec(type("TensorChunkSpec", (), {"split_dim": 1})())
        (Replicate(), TensorChunkSpec(dim=1))
    """
    if spec in (Replicate, Sum):
        return spec()
    kind = spec.__name__ if isinstance(spec, type) else type(spec).__name__
    if kind == "_Replicate":
        return Replicate()
    if kind == "TensorChunkSpec" and not isinstance(spec, TensorChunkSpec) and isinstance(getattr(spec, "split_dim", None), int):
        return TensorChunkSpec(spec.split_dim)
    return spec


def _is_spec(x: Any) -> bool:
    return isinstance(x, _SPEC_TYPES) or x in (Replicate, Sum) or _norm_spec(x) is not x

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

    @staticmethod
    def from_tuple(chunk_dims: tuple[Any, ...]) -> tuple[Any, ...]:
        """A tuple of specs from a tuple of dims, one per positional input (PyTorch pipelining's helper).

            >>> TensorChunkSpec.from_tuple((0, 1))
            (TensorChunkSpec(dim=0), TensorChunkSpec(dim=1))
        """
        if not isinstance(chunk_dims, tuple | list):
            raise TypeError(f"TensorChunkSpec.from_tuple: expected a tuple of ints (one dim per positional input), got "
                            f"{type(chunk_dims).__name__}; write e.g. TensorChunkSpec.from_tuple((0,))")
        return tuple(_specs_of(d, "from_tuple") for d in chunk_dims)

    @staticmethod
    def from_dict(chunk_dims: dict[str, Any]) -> dict[str, Any]:
        """A dict of specs from a dict of dims, one per keyword input (PyTorch pipelining's helper).

            >>> TensorChunkSpec.from_dict({"mask": 1})
            {'mask': TensorChunkSpec(dim=1)}
        """
        if not isinstance(chunk_dims, dict):
            raise TypeError(f"TensorChunkSpec.from_dict: expected a dict of ints (one dim per keyword input), got "
                            f"{type(chunk_dims).__name__}; write e.g. TensorChunkSpec.from_dict({{'mask': 0}})")
        return {k: _specs_of(d, "from_dict") for k, d in chunk_dims.items()}


def _specs_of(dims: Any, where: str) -> Any:
    """``TensorChunkSpec(d)`` for each int ``d`` in a nest of tuples, lists and dicts; other leaves kept (a spec).

        >>> _specs_of([0, {"a": 1}], "x")
        [TensorChunkSpec(dim=0), {'a': TensorChunkSpec(dim=1)}]
    """
    if isinstance(dims, bool):
        raise TypeError(f"TensorChunkSpec.{where}: expected an int dim, got {dims!r}; write the dim to split along")
    if isinstance(dims, int):
        return TensorChunkSpec(dims)
    if isinstance(dims, dict):
        return {k: _specs_of(v, where) for k, v in dims.items()}
    if isinstance(dims, tuple | list):
        return type(dims)(_specs_of(v, where) for v in dims)
    return dims


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

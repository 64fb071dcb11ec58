"""Split a batch into micro-batches and merge micro-batch outputs back (pytree aware).

    >>> import torch
    >>> chunks = split_batch((torch.arange(8).view(4, 2),), {}, 2)
    >>> [c[0][0].shape for c in chunks]
    [torch.Size([2, 2]), torch.Size([2, 2])]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["Replicate", "Sum", "TensorChunkSpec", "merge_chunks", "split_batch", "split_value"]


@dataclass(frozen=True, slots=True)
class TensorChunkSpec:
    """Split (and merge) a tensor along ``dim``.

        >>> TensorChunkSpec(1)
        TensorChunkSpec(dim=1)
    """

    dim: int = 0


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


ChunkSpec = TensorChunkSpec | Replicate | Sum


def split_value(value: Any, n: int, spec: Any = None, *, what: str = "input") -> list[Any]:
    """Split one pytree ``value`` into ``n`` micro-batch values following ``spec``.

    ``spec`` is None (tensors split on dim 0, 0-dim tensors and non-tensors replicated), one chunk
    spec for every leaf, or a pytree of specs matching ``value``.

        >>> [t.tolist() for t in split_value(torch.arange(4), 2)]
        [[0, 1], [2, 3]]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of micro-batches must be a positive int, got {n!r}")
    with_paths, treedef = pytree.tree_flatten_with_path(value)
    leaves = [leaf for _, leaf in with_paths]
    specs = _leaf_specs(spec, value, len(leaves), what)
    per_leaf = [
        _split_leaf(leaf, n, sp, f"{what} leaf {i} ({_NAMES.get(what, what)}{pytree.keystr(path)})")
        for i, ((path, leaf), sp) in enumerate(zip(with_paths, specs))
    ]
    return [pytree.tree_unflatten([col[k] for col in per_leaf], treedef) for k in range(n)]


_NAMES = {"positional argument": "args", "keyword argument": "kwargs"}


def split_batch(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    n: int,
    args_spec: Any = None,
    kwargs_spec: Any = None,
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Split positional and keyword arguments into ``n`` micro-batches of ``(args, kwargs)``.

        >>> mbs = split_batch((torch.zeros(4, 3),), {"mask": torch.ones(4)}, 4)
        >>> len(mbs), mbs[0][1]["mask"].shape
        (4, torch.Size([1]))
    """
    a = split_value(tuple(args), n, args_spec, what="positional argument")
    k = split_value(dict(kwargs), n, kwargs_spec, what="keyword argument")
    return [(tuple(a[i]), dict(k[i])) for i in range(n)]


def merge_chunks(chunks: Sequence[Any], spec: Any = None) -> Any:
    """Merge per-micro-batch outputs (same structure each) into one full-batch output.

    Tensors are concatenated along dim 0 by default; 0-dim tensors are averaged (the mean of
    equal-sized micro-batch means is the full-batch mean); non-tensors come from the first chunk.

        >>> merge_chunks([torch.ones(2), torch.zeros(2)]).tolist()
        [1.0, 1.0, 0.0, 0.0]
    """
    if not chunks:
        raise ValueError("merge_chunks needs at least one micro-batch output")
    flat = [pytree.tree_flatten(c) for c in chunks]
    leaves0, treedef = flat[0]
    specs = _leaf_specs(spec, chunks[0], len(leaves0), "output")
    merged = []
    for j, sp in enumerate(specs):
        col = [f[0][j] for f in flat]
        merged.append(_merge_leaf(col, sp))
    return pytree.tree_unflatten(merged, treedef)


def _leaf_specs(spec: Any, value: Any, n_leaves: int, what: str) -> list[Any]:
    if spec is None or isinstance(spec, TensorChunkSpec | Replicate | Sum):
        return [spec] * n_leaves
    try:
        specs = pytree.tree_flatten(spec, is_leaf=lambda x: isinstance(x, TensorChunkSpec | Replicate | Sum))[0]
    except Exception as exc:  # pragma: no cover - defensive
        raise ValueError(f"chunk spec for the {what} is not a pytree: {spec!r}") from exc
    if len(specs) != n_leaves:
        raise ValueError(
            f"chunk spec for the {what} has {len(specs)} leaves but the value has {n_leaves}; give one "
            "TensorChunkSpec/Replicate per tensor, in the same structure as the value (None means 'default')"
        )
    return specs


def _split_leaf(leaf: Any, n: int, spec: Any, where: str) -> list[Any]:
    if not isinstance(leaf, torch.Tensor) or isinstance(spec, Replicate) or (spec is None and leaf.dim() == 0):
        return [leaf] * n
    dim = spec.dim if isinstance(spec, TensorChunkSpec) else 0
    if leaf.dim() == 0:
        raise ValueError(f"{where} is a 0-dim tensor and cannot be split along dim {dim}; use Replicate()")
    size = leaf.shape[dim]
    if size < n:
        raise ValueError(
            f"{where} has size {size} along dim {dim}, smaller than the {n} micro-batches asked for. "
            f"Use a batch of at least {n} (a multiple of {n}), or fewer micro-batches."
        )
    if size % n:
        raise ValueError(
            f"{where} has size {size} along dim {dim}, which does not split into {n} equal micro-batches. "
            f"Use a batch size that is a multiple of {n} (e.g. {size - size % n} or {size + n - size % n}), "
            "or a micro-batch count that divides it. pippy never lowers the count silently."
        )
    return list(torch.chunk(leaf, n, dim=dim))


def _merge_leaf(col: list[Any], spec: Any) -> Any:
    first = col[0]
    if not isinstance(first, torch.Tensor) or isinstance(spec, Replicate):
        return first
    if isinstance(spec, Sum) or (spec is None and first.dim() == 0):
        total = torch.stack(col).sum(0)
        return total / len(col) if (spec is None or spec.mean) else total
    dim = spec.dim if isinstance(spec, TensorChunkSpec) else 0
    return torch.cat(col, dim=dim)

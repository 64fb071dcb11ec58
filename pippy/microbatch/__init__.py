"""Split a batch into micro-batches and merge micro-batch outputs back (pytree aware).

    >>> import torch
    >>> chunks = split_batch((torch.arange(8).view(4, 2),), {}, 2)
    >>> [c[0][0].shape for c in chunks]
    [torch.Size([2, 2]), torch.Size([2, 2])]
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from pippy.microbatch.blockmask import is_block_mask, split_block_mask
from pippy.microbatch.errors import PipeliningShapeError
from pippy.microbatch.specs import (
    _SPEC_TYPES,
    ChunkSpec,  # noqa: F401  (re-exported: its home before specs.py)
    Replicate,
    Sum,
    TensorChunkSpec,
    _CustomReducer,
    _is_spec,
    _norm_spec,
    _Replicate,  # noqa: F401  (re-exported: PiPPy's name)
    sum_reducer,
)

__all__ = [
    "Replicate",
    "Sum",
    "TensorChunkSpec",
    "ambiguous_merge_dims",
    "merge_chunks",
    "output_merge_dims",
    "split_args_kwargs_into_chunks",
    "split_batch",
    "split_leaves",
    "split_value",
    "sum_reducer",
    "uneven_split_inputs",
]

_debug_mask_minibatches = False
"""PiPPy's debug switch. When True (set it before ``pipeline()``), every micro-batch keeps the full batch
shape with the other micro-batches' rows zeroed, and merging takes each micro-batch's own rows: a model
that hard-codes the batch size runs, and rows that leak into each other show up as wrong outputs."""


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


def uneven_split_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], args_spec: Any = None,
                        kwargs_spec: Any = None) -> str:
    """Which inputs split by default (no chunk spec of their own) differ in size from the batch along
    their split dim, or ``""``: the first sign of an unbatched input (a ``[T]`` position tensor) that
    splitting cuts into pieces beside the batch's rows, which broadcasting may hide.

        >>> uneven_split_inputs((torch.zeros(8, 4), torch.arange(4)), {})
        'args[1] has 4 along dim 0, the batch (args[0]) has 8'
        >>> uneven_split_inputs((torch.zeros(8, 4), torch.arange(4)), {}, (None, TensorChunkSpec(0)))
        ''
        >>> uneven_split_inputs((torch.zeros(8, 5, 3), (torch.zeros(2, 8, 6), torch.zeros(2, 8, 6))), {})
        'args[1][0] has 2 along dim 0, args[1][1] has 2 along dim 0, the batch (args[0]) has 8'
        >>> uneven_split_inputs((torch.zeros(1, 5), torch.zeros(8, 5)), {})
        'args[0] has 1 along dim 0, the batch (args[1]) has 8'
    """
    found: list[tuple[str, int, int, bool]] = []  # (name, dim, size, spec given)
    for value, spec, what in ((args, args_spec, "positional argument"), (kwargs, kwargs_spec, "keyword argument")):
        with_paths = pytree.tree_flatten_with_path(value)[0]
        specs = _leaf_specs(spec, value, len(with_paths), what)
        for (path, leaf), sp in zip(with_paths, specs):
            if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and not isinstance(sp, Replicate | Sum):
                d = sp.dim if isinstance(sp, TensorChunkSpec) else 0
                if -leaf.dim() <= d < leaf.dim():
                    found.append((f"{_NAMES[what]}{pytree.keystr(path)}", d, int(leaf.shape[d]), sp is not None))
    # the batch: the first input's size (args[0] by convention), not the most common one, which an LSTM's
    # (h0, c0) states would win against its one input; a size-1 leaf first (a [1, T] position_ids) is passed over
    sized = [f for f in found if f[2] > 1] or found
    batch = sized[0][2] if sized else 0
    odd = [f"{nm} has {size} along dim {d}" for nm, d, size, given in found if size != batch and not given]
    if not odd:
        return ""
    return f"{', '.join(odd)}, the batch ({next(f[0] for f in found if f[2] == batch)}) has {batch}"


def split_args_kwargs_into_chunks(
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
    chunks: int,
    args_chunk_spec: Any = None,
    kwargs_chunk_spec: Any = None,
    _debug_mask_minibatches: bool | None = None,
) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]]]:
    """PiPPy's form of :func:`split_batch`: ``(per-chunk args tuples, per-chunk kwargs dicts)``.

        >>> a, k = split_args_kwargs_into_chunks((torch.zeros(4, 2),), {"m": torch.ones(4)}, 2)
        >>> a[1][0].shape, k[0]["m"].shape
        (torch.Size([2, 2]), torch.Size([2]))
    """
    with _masked(_debug_mask_minibatches):
        mbs = split_batch(tuple(args), dict(kwargs or {}), chunks, args_chunk_spec, kwargs_chunk_spec)
    return [a for a, _ in mbs], [k for _, k in mbs]


def merge_chunks(chunks: Sequence[Any], spec: Any = None, _debug_mask_minibatches: bool | None = None) -> Any:
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
    with _masked(_debug_mask_minibatches):
        for j, sp in enumerate(specs):
            col = [f[0][j] for f in flat]
            merged.append(_merge_leaf(col, sp))
    return pytree.tree_unflatten(merged, treedef)


def split_leaves(mb_args: tuple[Any, ...], mb_kwargs: dict[str, Any], args_spec: Any = None,
                 kwargs_spec: Any = None) -> list[tuple[torch.Tensor, int]]:
    """Every tensor of one micro-batch that the chunk specs split, with the dim they split it along.

        >>> [(tuple(t.shape), d) for t, d in split_leaves((torch.zeros(5, 2), 3), {}, (TensorChunkSpec(1), None))]
        [((5, 2), 1)]
    """
    return _split_dims(tuple(mb_args), args_spec, "positional argument") + _split_dims(
        dict(mb_kwargs), kwargs_spec, "keyword argument")


def _split_dims(value: Any, spec: Any, what: str) -> list[tuple[torch.Tensor, int]]:
    """(leaf, dim) of every tensor leaf of one micro-batch ``value`` that ``spec`` splits."""
    leaves = pytree.tree_leaves(value)
    out = []
    for leaf, sp in zip(leaves, _leaf_specs(spec, value, len(leaves), what)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and not isinstance(sp, Replicate | Sum):
            d = sp.dim if isinstance(sp, TensorChunkSpec) else 0
            out.append((leaf, d % leaf.dim()))
    return out


def output_merge_dims(mb_args: tuple[Any, ...], mb_kwargs: dict[str, Any], args_spec: Any, kwargs_spec: Any,
                      output_shapes: Sequence[Sequence[Any] | None]) -> list[int]:
    """The dim along which each output leaf's micro-batches concatenate, when no output spec is given.

    Dim 0, unless the inputs split along another dim (``TensorChunkSpec(1)`` for sequence-first
    tensors) and the output has the micro-batch's size at that same dim: then that dim, so the
    merged output has the model's own shape; when dim 0 has a micro-batch's size too, dim 0.
    Where the sizes are symbols (a trace with dynamic sizes), an output whose batch symbol sits at
    exactly one other dim (``o.T``, ``o.permute(1, 0, 2)``) merges along that dim; a plain number
    there may be a coincidence, so such outputs are only flagged by :func:`ambiguous_merge_dims`.
    ``mb_args`` / ``mb_kwargs`` are one micro-batch (the traced graph's input values, whose sizes
    are symbols where they vary); ``output_shapes`` the traced output shapes (None for a non-tensor).

        >>> x = torch.zeros(5, 2, 16)  # sequence first: the batch (2 per micro-batch) is dim 1
        >>> output_merge_dims((x,), {}, (TensorChunkSpec(1),), None, [(5, 2, 16), (2, 3), None])
        [1, 0, 0]
        >>> output_merge_dims((x,), {}, None, None, [(5, 2, 16)])
        [0]
    """
    pairs = [(d, leaf.shape[d]) for leaf, d in split_leaves(mb_args, mb_kwargs, args_spec, kwargs_spec)]
    sizes = {str(size) for _, size in pairs}  # str: a dynamic pipe's sizes are symbols ("s0")
    out = []
    for shape in output_shapes:
        hits = {d for d, size in pairs if shape is not None and d < len(shape) and str(shape[d]) == str(size)}
        if len(hits) == 1 and shape is not None and str(shape[0]) not in sizes:
            out.append(hits.pop())
        elif not hits and shape is not None and len(moved := _moved_batch_dims(shape, pairs, symbolic=True)) == 1:
            out.append(moved[0])
        else:  # no hit, several, or dim 0 has a micro-batch's size too (``[batch, classes]`` logits): dim 0
            out.append(0)
    return out


def _moved_batch_dims(shape: Sequence[Any], pairs: list[tuple[int, Any]], symbolic: bool) -> list[int]:
    """The dims of ``shape`` other than the split dims that have a micro-batch's size (only symbolic sizes when
    ``symbolic``, only plain numbers otherwise)."""
    split_dims = {d for d, _ in pairs}
    wanted = {str(size) for _, size in pairs if isinstance(size, int) != symbolic}
    return [d for d in range(len(shape)) if d not in split_dims and str(shape[d]) in wanted]


def ambiguous_merge_dims(mb_args: tuple[Any, ...], mb_kwargs: dict[str, Any], args_spec: Any, kwargs_spec: Any,
                         output_shapes: Sequence[Sequence[Any] | None]) -> list[int]:
    """The outputs whose merge dim :func:`output_merge_dims` had to guess from plain numbers: a split dim has a
    micro-batch's size and another dim has one too (a ``[seq, batch]`` output whose sequence is as long as a
    micro-batch, an LSTM's ``h_n`` ``[layers, batch, hidden]`` with as many layers as a micro-batch has rows,
    ``[batch, 2]`` logits of 2-row micro-batches), or no split dim has it but another dim does (``o.T``: the batch
    moved, or a width that happens to equal the micro-batch size). Size 1 says nothing (a trace fixes it). Symbolic
    sizes (a dynamic trace) are never ambiguous: the batch has its own symbol.

        >>> x = torch.zeros(2, 2, 16)  # sequence first, as long as a micro-batch (2)
        >>> ambiguous_merge_dims((x,), {}, (TensorChunkSpec(1),), None, [(2, 2, 16), (5, 2)])
        [0]
        >>> ambiguous_merge_dims((torch.zeros(4, 3),), {}, None, None, [(3, 4), (4, 3), (12, 5), (4, 4), (2, 4, 6)])
        [0, 3, 4]
    """
    pairs = [(d, leaf.shape[d]) for leaf, d in split_leaves(mb_args, mb_kwargs, args_spec, kwargs_spec)
             if isinstance(leaf.shape[d], int) and leaf.shape[d] > 1]
    sizes = {str(size) for _, size in pairs}
    out = []
    for j, shape in enumerate(output_shapes):
        if not shape:
            continue
        at_split = [d for d, size in pairs if d < len(shape) and shape[d] == size]
        hits = [d for d in range(len(shape)) if str(shape[d]) in sizes]
        if (at_split and len(hits) > 1) or (
                not at_split and str(shape[0]) not in sizes and _moved_batch_dims(shape, pairs, symbolic=False)):
            out.append(j)
    return out


_MASK_CALL: contextvars.ContextVar[bool | None] = contextvars.ContextVar("pippy_mask_minibatches", default=None)


@contextlib.contextmanager
def _masked(on: bool | None) -> Iterator[None]:
    """Within the block (this thread / task only), mask mode is ``on``; None leaves the module switch in charge."""
    if on is None:
        yield
        return
    token = _MASK_CALL.set(bool(on))
    try:
        yield
    finally:
        _MASK_CALL.reset(token)


def _mask_on() -> bool:
    call = _MASK_CALL.get()
    return bool(_debug_mask_minibatches) if call is None else call


def _leaf_specs(spec: Any, value: Any, n_leaves: int, what: str) -> list[Any]:
    spec = _norm_spec(spec)
    if spec is None or isinstance(spec, _SPEC_TYPES):
        return [spec] * n_leaves
    if isinstance(spec, dict) and isinstance(value, dict) and set(spec) != set(value):
        raise ValueError(
            f"chunk spec for the {what} names {sorted(spec)} but the value has {sorted(value)}; key the spec by the "
            "same names (e.g. KwargsChunkSpec / kwargs_chunk_spec with the model's keyword argument names)"
        )
    try:
        specs = pytree.tree_flatten(spec, is_leaf=_is_spec)[0]
    except Exception as exc:  # pragma: no cover - defensive
        raise ValueError(f"chunk spec for the {what} is not a pytree: {spec!r}") from exc
    if len(specs) != n_leaves:
        raise ValueError(
            f"chunk spec for the {what} has {len(specs)} leaves but the value has {n_leaves}; give one "
            "TensorChunkSpec/Replicate per tensor, in the same structure as the value (None means 'default')"
        )
    return [_norm_spec(sp) for sp in specs]


def _split_leaf(leaf: Any, n: int, spec: Any, where: str) -> list[Any]:
    if is_block_mask(leaf) and not isinstance(spec, Replicate) and not _mask_on():
        return split_block_mask(leaf, n, where)  # flex attention's mask: its rows, its mask_mod shifted
    if not isinstance(leaf, torch.Tensor) or isinstance(spec, Replicate) or (spec is None and leaf.dim() == 0):
        return [leaf] * n
    dim = spec.dim if isinstance(spec, TensorChunkSpec) else 0
    if leaf.dim() == 0:
        raise ValueError(f"{where} is a 0-dim tensor and cannot be split along dim {dim}; use Replicate()")
    size = leaf.shape[dim]
    if size < n:
        raise PipeliningShapeError(
            f"{where} has size {size} along dim {dim}, smaller than the {n} micro-batches asked for. "
            f"Use a batch of at least {n} (a multiple of {n}), or fewer micro-batches; if this input is not batched "
            "(positions, a mask shared by every row), give it Replicate() in its chunk spec."
        )
    if size % n:
        raise PipeliningShapeError(
            f"{where} has size {size} along dim {dim}, which does not split into {n} equal micro-batches. "
            f"Use a batch size that is a multiple of {n} (e.g. {size - size % n} or {size + n - size % n}), "
            "or a micro-batch count that divides it (pippy never lowers the count silently); if this input is not "
            "batched (positions, a mask shared by every row), give it Replicate() in its chunk spec."
        )
    parts = list(torch.chunk(leaf, n, dim=dim))
    if not _mask_on():
        return parts
    zeros = [torch.zeros_like(p) for p in parts]  # full shape, only this micro-batch's rows kept
    return [torch.cat([*zeros[:i], p, *zeros[i + 1 :]], dim=dim) for i, p in enumerate(parts)]


def _merge_leaf(col: list[Any], spec: Any) -> Any:
    first = col[0]
    if isinstance(spec, _CustomReducer):
        return functools.reduce(spec.reduce_fn, col, spec.init_value)
    if isinstance(spec, Sum) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in col):
        return sum(col) / len(col) if spec.mean else sum(col)  # a count of rows (x.shape[0]) adds up
    if not isinstance(first, torch.Tensor) or isinstance(spec, Replicate):
        return first
    if isinstance(spec, Sum) or (spec is None and first.dim() == 0):
        total = torch.stack(col).sum(0)
        return total / len(col) if (spec is None or spec.mean) else total
    dim = spec.dim if isinstance(spec, TensorChunkSpec) else 0
    if _mask_on() and first.dim() > dim and first.shape[dim] % len(col) == 0:
        col = [torch.tensor_split(t, len(col), dim=dim)[i] for i, t in enumerate(col)]  # each one's own rows
    return torch.cat(col, dim=dim)

"""A traced scalar's reduction chain: back to the sum / mean / loss op that removes the batch, and which dim it removes.

The walk passes copies, scaling and shape ops; it also says what a mean over the batch may
divide by. This is the graph reading under :mod:`pippy.frontend.reduction`, which decides from it whether a scalar
output sums or averages its batch. A loss traced on micro-batches of 4 rows: the walk passes the division by
8 and the scaling, and stops at ``relu``, whose rows (dim 0) the ``sum`` on the way removes:

    >>> class Loss(torch.nn.Module):
    ...     def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ...         return (x.relu() * 3).sum() / 8, x.sum(0)
    >>> gm = torch.export.export(Loss(), (torch.randn(4, 3),)).module()
    >>> loss, column_sums = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    >>> node, chain, divisors, found = walk_chain(loss)
    >>> aten_op(node)[0], [aten_op(n)[0] for n in chain], divisors, found
    ('relu', ['sum'], [8], None)
    >>> decide_reduction(node, chain, frozenset({4}), found), mean_counts(node, 0)  # a mean would divide by 4 or 12
    (('sum', 0), {4, 12})
    >>> is_flat(column_sums, frozenset({4})), is_flat(node, frozenset({4}))  # rows gone / still there
    (True, False)
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import guard_or_false

__all__ = ["CHAIN_OPS", "aten_arg", "aten_op", "decide_reduction", "is_flat", "is_int", "mean_counts", "walk_chain"]

# ops that keep a value's meaning: copies, dtype, sign (anywhere), and shape ops (only outside the reductions, where
# they reshape their result, as ``loss.reshape(1)``: inside, they would move the dims the reductions name)
_PASS = {"clone", "_to_copy", "to", "alias", "contiguous", "neg"}
_SHAPE = {"view", "reshape", "_unsafe_view", "squeeze", "unsqueeze", "expand", "flatten"}
_SCALE = {"mul", "div"}
CHAIN_OPS = _PASS | _SHAPE | _SCALE  # what a walk back from a loss passes (outside its reductions)
_REDUCTIONS = {1: "mean", 2: "sum"}  # at::Reduction: None = 0, Mean = 1, Sum = 2


def walk_chain(node: Any) -> tuple[Any, list[Any], list[int], str | None]:
    """From a scalar back to the tensor its reductions reduce: that node, the ``sum`` / ``mean`` nodes on the way
    (outside in), the ints it is divided by, and a loss op's own reduction when one reduces every dim."""
    chain: list[Any] = []
    divisors: list[int] = []
    for _ in range(64):
        name, schema = aten_op(node)
        if schema is None:
            break
        if name in _PASS or (name in _SHAPE and not chain):
            node = node.args[0]
        elif name in _SCALE and len(node.args) > 1 and isinstance(node.args[1], int | float):
            if name == "div" and is_int(node.args[1]):
                divisors.append(int(node.args[1]))
            node = node.args[0]
        elif name in ("sum", "mean"):
            chain.append(node)
            node = node.args[0]
        else:
            value = aten_arg(node, schema, "reduction")
            if isinstance(value, int) and value in _REDUCTIONS:  # a loss op reducing every dim, the batch's too
                return (node.args[0] if node.args else node), chain, divisors, _REDUCTIONS[value]
            break
    return node, chain, divisors, None


def decide_reduction(node: Any, chain: list[Any], rows: frozenset[int], found: str | None
                     ) -> tuple[str | None, int | None]:
    """``found`` (a loss op's) or which of ``chain`` removes the batch dim of ``node``'s value, and that dim. Every dim
    of a micro-batch's size may be the batch: they must all give one answer (a full ``sum()`` does), else None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return found, None
    dims = [d for d, s in enumerate(val.shape) if isinstance(s, int) and s in rows] if rows else [0]
    if found is not None:
        return found, dims[0] if dims else None
    if not dims:  # a flattened batch: only a reduction of every dim is sure to take it
        full = chain and _reduced_dims(chain[-1], val.dim())[0] == set(range(val.dim()))
        return (aten_op(chain[-1])[0], None) if full else (None, None)
    answers = {_batch_reduction(val.dim(), chain, d) for d in dims}
    return (answers.pop(), dims[0]) if len(answers) == 1 else (None, None)


def is_flat(node: Any, rows: frozenset[int]) -> bool:
    """Whether ``node``'s value has dims but none of a micro-batch's size, and no chain of shape-only ops or ops that
    keep its dim 0 (``nll_loss(log_softmax(logits.view(-1, V)), reduction="none")``) leads back to one that has:
    its batch may be flattened into it or removed already."""
    for _ in range(64):
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if not rows or not isinstance(val, torch.Tensor) or val.dim() == 0 or any(
                (isinstance(s, int) and s in rows) or (isinstance(s, torch.SymInt) and not s.node.has_hint())
                for s in val.shape):  # a data-dependent size (``h[mask]``'s rows) is taken as the batch's
            return False
        name, schema = aten_op(node)
        first = node.args[0] if node.args else None
        prev = first.meta.get("val") if isinstance(first, fx.Node) else None
        # a data-dependent size (``h[mask]``) compares as unknown, not as a guard on the data
        keeps = isinstance(prev, torch.Tensor) and prev.dim() > 0 and guard_or_false(prev.shape[0] == val.shape[0])
        if schema is None or not (name in _SHAPE | _PASS or keeps):  # per-row ops (log_softmax, nll_loss) keep dim 0
            return True
        node = first
    return True


def _batch_reduction(ndim: int, chain: list[Any], batch: int) -> str | None:
    """Which of ``chain`` (sum / mean from the outside in, over a value of ``ndim`` dims) removes its dim ``batch``."""
    for red in reversed(chain):
        dims, keep = _reduced_dims(red, ndim)
        if batch in dims:
            return aten_op(red)[0]
        if not keep:
            batch -= sum(1 for d in dims if d < batch)
            ndim -= len(dims)
    return None


def mean_counts(node: Any, batch: int | None) -> set[int]:
    """What a mean of ``node``'s value over its batch may divide by: its rows times any of its other dims."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if batch is None or not isinstance(val, torch.Tensor) or not isinstance(val.shape[batch], int):
        return set()
    rows, rest = int(val.shape[batch]), [int(s) for d, s in enumerate(val.shape) if d != batch and isinstance(s, int)][:6]
    if rows == 1:
        return set()  # one row: x.sum() / x.shape[1] (a per-row mean, summed) would look the same
    return {rows * math.prod(c) for r in range(len(rest) + 1) for c in itertools.combinations(rest, r)}


def _reduced_dims(node: Any, ndim: int) -> tuple[set[int], bool]:
    """The dims a ``sum`` / ``mean`` node reduces of a value with ``ndim`` dims, and whether it keeps them."""
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keep = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
    if isinstance(dim, torch.dtype) or dim is None or (isinstance(dim, list | tuple) and not dim):
        return set(range(ndim)), keep  # sum(x, dtype) / sum(x, []) reduce every dim
    dims = dim if isinstance(dim, list | tuple) else [dim]
    return {int(d) % ndim for d in dims} if ndim else set(), keep


def aten_op(node: Any) -> tuple[str, Any]:
    """The ATen op a ``call_function`` node runs, by short name, and its schema; ``("", None)`` for any other node.

        >>> g = torch.fx.Graph(); x = g.placeholder("x")
        >>> aten_op(g.call_function(torch.ops.aten.relu.default, (x,)))[0], aten_op(x)
        ('relu', ('', None))
    """
    schema = getattr(getattr(node, "target", None), "_schema", None)
    if getattr(node, "op", None) != "call_function" or schema is None:
        return "", None
    return schema.name.split("::")[-1], schema


def aten_arg(node: Any, schema: Any, name: str) -> Any:
    """Argument ``name`` of an aten op's ``node`` as called: given by keyword, by position, or its default; None when
    the op (``schema``) has no such argument.

        >>> g = torch.fx.Graph()
        >>> x, y = g.placeholder("x"), g.placeholder("y")
        >>> ce = g.call_function(torch.ops.aten.cross_entropy_loss.default, (x, y), {"ignore_index": 0})
        >>> schema = aten_op(ce)[1]
        >>> aten_arg(ce, schema, "target") is y, aten_arg(ce, schema, "ignore_index"), aten_arg(ce, schema, "reduction")
        (True, 0, 1)
    """
    pos = next((k for k, a in enumerate(schema.arguments) if a.name == name), None)
    if pos is None:
        return None
    return node.kwargs.get(name, node.args[pos] if len(node.args) > pos else schema.arguments[pos].default_value)


def is_int(value: Any) -> bool:
    """An int divisor, as a size baked in by the trace is (``x.shape[0]``, ``len(x)``, ``x.numel()``).

        >>> is_int(8), is_int(8.0), is_int(True)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool)

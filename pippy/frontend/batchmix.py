"""Ops that mix a batch's rows with one another (``u @ v.T``, pairwise distances): micro-batches cannot see that.

A pipeline runs each micro-batch alone, so an op whose result pairs every row with every other
row (in-batch negatives, a contrastive loss over ``u @ v.T``) gives each micro-batch only its
own block of the pairs. The loss and its gradients then differ from the model's. Such an op
has two dims that grow with the batch; :func:`mixed_rows` finds the candidates in the trace
(a result with more micro-batch-sized dims than any of its inputs) and confirms each in the
trace of a batch twice as large, where both dims double.

    >>> import torch
    >>> from pippy.frontend.trace import export_module
    >>> class Pairs(torch.nn.Module):
    ...     def forward(self, u, v):
    ...         return (u @ v.T).logsumexp(1)
    >>> small = export_module(Pairs(), (torch.ones(2, 3), torch.ones(2, 3))).module()
    >>> big = export_module(Pairs(), (torch.ones(4, 3), torch.ones(4, 3))).module()
    >>> [m.split(": ")[-1] for m in mixed_rows(small, frozenset({2}), lambda: big)]
    ['return (u @ v.T).logsumexp(1)']
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from pippy.frontend.trace import model_line

__all__ = ["mixed_rows"]


def _batch_dims(val: torch.Tensor, rows: frozenset[int]) -> int:
    return sum(1 for d in val.shape if isinstance(d, int) and d in rows)


def _is_view(node: fx.Node) -> bool:
    """Whether ``node``'s result aliases an input (``unsqueeze``, ``expand``): it moves dims, it pairs no rows."""
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _candidates(gm: fx.GraphModule, rows: frozenset[int]) -> list[fx.Node]:
    """Results of two or more tensors (not views) with two or more micro-batch-sized dims where every input has fewer."""
    out = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, torch.Tensor) or _batch_dims(val, rows) < 2 \
                or _is_view(node):
            continue
        ins = [a.meta.get("val") for a in node.all_input_nodes]
        ins = [v for v in ins if isinstance(v, torch.Tensor)]
        # a pairing takes two operands (u @ v.T, u - v); one input's new size-1 dims are a keepdim reduction's
        if len(ins) >= 2 and all(_batch_dims(v, rows) < _batch_dims(val, rows) for v in ins):
            out.append(node)
    return out


def mixed_rows(gm: fx.GraphModule, rows: frozenset[int], twice: Callable[[], fx.GraphModule | None]) -> list[str]:
    """Where ``gm`` (traced on one micro-batch of ``rows`` rows) pairs rows with rows: the model's source line of
    each op whose result has two dims that double in ``twice()`` (the trace on a batch twice as large)."""
    found = _candidates(gm, rows) if rows else []
    if not found:
        return []
    big = twice()
    if big is None:
        return []
    other = {n.name: n for n in big.graph.nodes}
    out: list[str] = []
    for node in found:
        twin = other.get(node.name)
        a, b = node.meta.get("val"), twin.meta.get("val") if twin is not None else None
        if twin is None or twin.target != node.target or not isinstance(b, torch.Tensor) or a.dim() != b.dim():
            continue
        grown = [d for d in range(a.dim()) if isinstance(a.shape[d], int) and isinstance(b.shape[d], int)
                 and b.shape[d] == 2 * a.shape[d]]
        if len(grown) >= 2:
            where = model_line(node) or f"the op {node.target} ({node.name})"
            if where not in out:
                out.append(where)
    return out

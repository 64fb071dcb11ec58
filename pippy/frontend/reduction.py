"""How a traced scalar output reduces its batch (a sum or a mean), read off the graph, so micro-batches merge right.

A model's loss is a *mean* when the full batch's value is the mean of equal micro-batches' values,
and a *sum* when it is their sum. The graph says which: ``x.mean()``, ``x.sum()``, a loss op's
``reduction=`` argument, each scaled by plain numbers. A number that equals one micro-batch's size
(or its size times other dims of an input, a token count) is the batch size baked into the trace
by ``x.sum() / x.shape[0]``: that sum is a mean per micro-batch.

    >>> import torch
    >>> from pippy import pipeline
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x.sum() / x.shape[0], x.sum() / 10, x.amax()
    >>> pipeline(Net(), 2, (torch.ones(4, 3),)).output_reductions
    ['mean', 'sum', None]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

__all__ = ["batch_counts", "graph_reduction", "model_reduction", "output_reductions"]

# ops that keep a value's meaning (shape, dtype, copies) and pointwise scaling by a plain number
_PASS = {"view", "reshape", "_unsafe_view", "squeeze", "unsqueeze", "clone", "_to_copy", "to", "alias", "contiguous",
         "expand", "flatten", "neg"}
_SCALE = {"mul", "div"}
_REDUCTIONS = {1: "mean", 2: "sum"}  # at::Reduction: None = 0, Mean = 1, Sum = 2


def batch_counts(split: Iterable[tuple[torch.Tensor, int]]) -> frozenset[int]:
    """The counts a per-micro-batch mean may divide by: for each ``(input, d)`` of one micro-batch split along
    dim ``d`` (:func:`pippy.microbatch.split_leaves`), its size there times the sizes of any of its other dims
    (rows, tokens, elements). A micro-batch of one row gives none: ``x.sum() / x.shape[1]`` would look the same.

        >>> sorted(batch_counts([(torch.zeros(2, 5), 0), (torch.zeros(1, 3), 0)]))
        [2, 10]
    """
    out: set[int] = set()
    for leaf, d in split:
        sizes = list(leaf.shape)
        if not all(isinstance(s, int) for s in sizes) or sizes[d] == 1:
            continue  # a symbolic size is never baked in as a number
        rest = [s for k, s in enumerate(sizes) if k != d][:6]
        for r in range(len(rest) + 1):
            for combo in itertools.combinations(rest, r):
                out.add(int(sizes[d]) * math.prod(combo))
    return frozenset(out)


def graph_reduction(node: Any, counts: frozenset[int] = frozenset()) -> str | None:
    """How the scalar a traced graph computes at ``node`` reduces its batch: ``"mean"``, ``"sum"``, or None.

    Follows shape-only ops and scaling by plain numbers back to a ``mean`` / ``sum`` or a loss op's
    ``reduction`` argument (``cross_entropy_loss``, ``mse_loss``, ... read from the op's schema). A sum
    divided by an int ``c`` in ``counts`` (see :func:`batch_counts`) is a mean: the micro-batch's
    size was baked in as that int when tracing ``x.sum() / x.shape[0]``.

        >>> from pippy import pipeline
        >>> class Net(torch.nn.Module):
        ...     def forward(self, x):
        ...         return torch.nn.functional.mse_loss(x * 2, torch.zeros_like(x), reduction="sum") / 3
        >>> gm = pipeline(Net(), 1, (torch.ones(2, 2),)).get_stage_module(0)
        >>> out = next(iter(gm.graph.find_nodes(op="output"))).args[0][0]
        >>> graph_reduction(out), graph_reduction(out, frozenset({3}))
        ('sum', 'mean')
    """
    found: str | None = None
    per_count = False  # a plain number equal to a micro-batch count scaled the value on the way
    for _ in range(64):
        name, schema = _op(node)
        if schema is not None and name in _PASS:
            node = node.args[0]
            continue
        if schema is not None and name in _SCALE and len(node.args) > 1 and isinstance(node.args[1], int | float):
            per_count = per_count or _is_count(node.args[1], name, counts)
            node = node.args[0]
            continue
        if found is not None or schema is None:
            break  # below the batch's reduction, other reductions run over other dims: the outer one stands
        if name in ("mean", "sum"):
            found = name
            if name == "sum" and node.args:
                node = node.args[0]  # a sum of scaled terms, as in (x / x.shape[0]).sum(), is a mean too
                continue
            break
        pos = next((k for k, a in enumerate(schema.arguments) if a.name == "reduction"), None)
        if pos is not None:
            value = node.kwargs.get("reduction", node.args[pos] if len(node.args) > pos
                                    else schema.arguments[pos].default_value)
            found = _REDUCTIONS.get(value) if isinstance(value, int) else None
        break
    return "mean" if found == "sum" and per_count else found


def model_reduction(gm: Any, index: int | None, counts: frozenset[int] = frozenset()) -> str | None:
    """How flat output ``index`` of graph ``gm`` (a model's own loss) reduces the batch (see :func:`graph_reduction`).

        >>> from pippy import pipeline
        >>> class Net(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x.sum()
        >>> model_reduction(pipeline(Net(), 1, (torch.ones(2, 2),)).get_stage_module(0), 0)
        'sum'
    """
    if index is None or not isinstance(gm, fx.GraphModule):
        return None
    values = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    if not isinstance(values, tuple | list) or index >= len(values):
        return None
    return graph_reduction(values[index], counts)


def output_reductions(gm: fx.GraphModule, counts: frozenset[int]) -> list[str | None]:
    """Per flat output of ``gm``: how a 0-dim output reduces the batch (None for other outputs or when unknown).

        >>> from pippy import pipeline
        >>> gm = pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(2, 2),)).get_stage_module(0)
        >>> output_reductions(gm, frozenset())
        [None]
    """
    values = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    values = values if isinstance(values, tuple | list) else (values,)
    out: list[str | None] = []
    for v in values:
        val = v.meta.get("val") if isinstance(v, fx.Node) else None
        out.append(graph_reduction(v, counts) if isinstance(val, torch.Tensor) and val.dim() == 0 else None)
    return out


def _op(node: Any) -> tuple[str, Any]:
    schema = getattr(getattr(node, "target", None), "_schema", None)
    if getattr(node, "op", None) != "call_function" or schema is None:
        return "", None
    return schema.name.split("::")[-1], schema


def _is_count(value: float, op: str, counts: frozenset[int]) -> bool:
    """Whether scaling by ``value`` (``op`` is mul or div) divides by one of ``counts``: only an int divisor, as a
    size baked in by the trace is (``x.shape[0]``, ``len(x)``, ``x.numel()``); ``0.5 * x.sum()`` stays a sum."""
    return op == "div" and isinstance(value, int) and not isinstance(value, bool) and value in counts

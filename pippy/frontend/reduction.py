"""How a traced scalar output reduces its batch (a sum or a mean), read off the graph, so micro-batches merge right.

A model's loss is a *mean* when the full batch's value is the mean of equal micro-batches' values,
and a *sum* when it is their sum. The graph says which: the reduction that removes the batch dim
(``x.mean()``, ``x.sum(0)``, a loss op's ``reduction=``), scaled by plain numbers. An int divisor
that equals one micro-batch's size (or its size times other dims of an input, a token count) is
the batch size baked into the trace by ``x.sum() / x.shape[0]``: that sum is a mean per micro-batch.
A scalar that no batched input reaches (a weight's norm) is the same in every micro-batch. A sum
of terms with one answer has that answer. A value whose batch an op micro-batches cannot rebuild
removed (``x.amax()``, ``x.var(0)``) is ``"unknown"``, and :func:`pipeline` warns about it.

    >>> import torch, warnings
    >>> from pippy import pipeline
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x.sum() / x.shape[0], x.sum() / 10, x.mean(0).sum() + x.mean(), x.sum(0).mean(), x.amax()
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     pipeline(Net(), 2, (torch.ones(4, 3),)).output_reductions
    ['mean', 'sum', 'mean', 'sum', 'unknown']
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from pippy.frontend.inline import inline_regions
from pippy.frontend.reducechain import aten_op, decide_reduction, is_flat, is_int, mean_counts, walk_chain

__all__ = ["MicroBatch", "constant_value", "count_divisors", "divides_by_count", "graph_outputs", "graph_reduction", "model_reduction", "output_reductions"]

@dataclass(frozen=True, slots=True)
class MicroBatch:
    """One traced micro-batch as a scalar's reduction sees it: ``rows``, its size along each split dim; ``counts``,
    what a per-micro-batch mean may divide by (rows times any other dims of a split input: tokens, elements);
    ``inputs``, the graph's placeholders that carry the batch (None: any placeholder may); ``symbols``, the batch
    sizes a dynamic trace keeps symbolic (sympy expressions); ``ones``, the counts of split inputs of one row,
    kept apart: there ``x.shape[0]`` is 1 and ``x.shape[0] * x.shape[1]`` equals ``x.shape[1]``.

        >>> mb = MicroBatch.of([(torch.zeros(2, 5), 0), (torch.zeros(1, 3), 0)])
        >>> sorted(mb.rows), sorted(mb.counts), sorted(mb.ones)
        ([1, 2], [2, 10], [1, 3])
        >>> sorted(mb.doubled().rows), sorted(mb.doubled().counts)
        ([2, 4], [2, 4, 6, 20])
    """

    rows: frozenset[int] = frozenset()
    counts: frozenset[int] = frozenset()
    inputs: frozenset[str] | None = None
    symbols: frozenset[Any] = frozenset()
    ones: frozenset[int] = frozenset()

    @classmethod
    def of(cls, split: Iterable[tuple[Any, int]], inputs: Iterable[str] | None = None) -> MicroBatch:
        """From ``(input, dim)`` of every split input of one micro-batch (:func:`pippy.microbatch.split_leaves`).
        A micro-batch of one row gives no counts, only ``ones``: ``x.sum() / x.shape[1]`` would look the same."""
        rows: set[int] = set()
        counts: set[int] = set()
        ones: set[int] = set()
        symbols: set[Any] = set()
        for leaf, d in split:
            sizes = list(leaf.shape)
            if not isinstance(sizes[d], int):
                if isinstance(sizes[d], torch.SymInt):
                    symbols.add(sizes[d].node.expr)
                continue  # a symbolic batch size is never baked in as a number
            rows.add(sizes[d])
            rest = [s for k, s in enumerate(sizes) if k != d and isinstance(s, int)][:6]
            for r in range(len(rest) + 1):
                for combo in itertools.combinations(rest, r):
                    (ones if sizes[d] == 1 else counts).add(sizes[d] * math.prod(combo))
        return cls(frozenset(rows), frozenset(counts), None if inputs is None else frozenset(inputs), frozenset(symbols),
                   frozenset(ones))

    def doubled(self) -> MicroBatch:
        """This micro-batch twice over, as the trace on a batch twice as large sees it: every row count doubles."""
        return MicroBatch(frozenset(2 * r for r in self.rows), frozenset(2 * c for c in self.counts | self.ones),
                          self.inputs, self.symbols)


def graph_reduction(node: Any, mb: MicroBatch | None = None, literals: frozenset[int] = frozenset(),
                    grows: Callable[[Any], bool] | None = None) -> str | None:
    """How the scalar a traced graph computes at ``node`` reduces its batch: ``"mean"``, ``"sum"``, or None.

    Follows shape-only ops, scaling by plain numbers and ``sum`` / ``mean`` reductions back to the
    tensor they reduce, or to a loss op's ``reduction`` argument (``cross_entropy_loss``, ``mse_loss``,
    ... read from the op's schema); the reduction that removes the batch dim (the dim of a size in
    ``mb.rows``, dim 0 first; dim 0 when ``mb`` says none) decides. A sum divided by an int that counts
    that tensor's rows, or its rows times other dims of it (tokens, elements), is a mean: the trace
    baked the micro-batch's count in, unless it is in ``literals`` (a trace on a batch twice as large kept it).
    A reduced tensor with no dim of a micro-batch's size counts only when ``grows(node)`` says its value grows with
    the batch (a flattened batch); else an op the walk does not follow (``h.mean(0).abs()``, ``h.var(0)``) may
    have removed the batch already. None when no reduction removes a batch dim, no batched input reaches the
    value, or the ops say nothing.

        >>> from pippy import pipeline
        >>> class Net(torch.nn.Module):
        ...     def forward(self, x):
        ...         loss = torch.nn.functional.mse_loss(x * 2, torch.zeros_like(x), reduction="sum")
        ...         return loss / 3, loss / x.shape[0], loss / x.numel()
        >>> gm = pipeline(Net(), 1, (torch.ones(2, 5),)).get_stage_module(0)
        >>> [graph_reduction(v) for v in next(iter(gm.graph.find_nodes(op="output"))).args[0]]
        ['sum', 'mean', 'mean']
    """
    mb = mb or MicroBatch()
    node, chain, divisors, found = walk_chain(node)
    if not chain and found is None and aten_op(node)[0] in ("add", "sub"):
        found = _terms(node, mb, literals, grows)  # loss + aux: one answer for every term
        counts = set(mb.counts) if mb.rows != frozenset({1}) else set()
        return "mean" if found == "sum" and (set(divisors) - literals) & counts else found
    found, batch = decide_reduction(node, chain, mb.rows, found)
    if found is None or not _reaches(node, mb.inputs):
        return None
    if batch is None and is_flat(node, mb.rows) and not (grows is not None and grows(node)):
        return None  # no dim of a micro-batch's size: a flattened batch (it grows with it), or one removed already
    counts = mean_counts(node, batch) if batch is not None else set(mb.counts)
    return "mean" if found == "sum" and (set(divisors) - literals) & counts else found


def _terms(node: Any, mb: MicroBatch, literals: frozenset[int], grows: Callable[[Any], bool] | None) -> str | None:
    """The reduction of a sum or difference of scalars: the one its batched terms share (a term no batched input
    reaches adds the same to every micro-batch, which only a mean keeps), else None."""
    terms = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(terms) != 2 or any(not isinstance(t.meta.get("val"), torch.Tensor) or t.meta["val"].dim() for t in terms):
        return None
    batched = [t for t in terms if _reaches(t, mb.inputs)]
    answers = {graph_reduction(t, mb, literals, grows) for t in batched}
    if len(answers) != 1:
        return None
    found = answers.pop()
    return found if len(batched) == 2 or found == "mean" else None


def count_divisors(node: Any) -> list[int]:
    """The ints the scalar at ``node`` is divided by on the way to its reduction (see :func:`graph_reduction`).

        >>> from pippy import pipeline
        >>> class Net(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x.sum() / x.shape[0] / 3
        >>> gm = pipeline(Net(), 1, (torch.ones(2, 5),)).get_stage_module(0)
        >>> count_divisors(next(iter(gm.graph.find_nodes(op="output"))).args[0][0])
        [3, 2]
    """
    return walk_chain(node)[2]


def model_reduction(gm: Any, index: int | None, mb: MicroBatch | None = None) -> str | None:
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
    values = next(iter(inline_regions(gm).graph.find_nodes(op="output"))).args[0]
    if not isinstance(values, tuple | list) or index >= len(values):
        return None
    return graph_reduction(values[index], mb)


def output_reductions(gm: fx.GraphModule, mb: MicroBatch, twice: Callable[[], fx.GraphModule | None] | None = None
                      ) -> list[str | None]:
    """Per flat output of ``gm``: ``"sum"`` / ``"mean"`` for one whose graph reduces the batch dim away (a loss, or
    ``h.mean(0)``), ``"same"`` for a tensor no batched input reaches (alike in every micro-batch, given once), None
    for the others (batched outputs, which concatenate). ``"unknown"`` for a tensor a batched input reaches whose
    batch is gone by ops micro-batch values cannot rebuild (``h.amax()``, ``h.var(0)``, ``h.norm()``): 0-dim, or
    with no dim of a micro-batch's size that grows in ``twice()``. A plain number that doubles in ``twice()``
    (the trace on the micro-batch twice over) is a count baked from the batch's size (``x.shape[0]``): "sum";
    one that changes there otherwise (``x.shape[0] * 2 + 1``) is "derived", which micro-batches cannot rebuild.
    On micro-batches of one row, a sum divided by an int is read off ``twice()`` (``x.sum() / x.shape[0]`` divides
    by 1 there); ``"ambiguous"`` when that cannot tell.

        >>> from pippy import pipeline
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.ones(3))
        ...     def forward(self, x):
        ...         return x * self.w, (x * self.w).mean(0), self.w * 2
        >>> gm = pipeline(Net(), 2, (torch.ones(4, 3),)).get_stage_module(0)
        >>> output_reductions(gm, MicroBatch.of([(torch.ones(2, 3), 0)], ["x"]))
        [None, 'mean', 'same']
    """
    values = graph_outputs(inline_regions(gm))  # a loss under torch.autocast in forward reads like any other
    out: list[str | None] = []
    big: list[Any] | None = None

    def bigger(j: int) -> Any:  # output j of the trace of a batch twice as large (None when that trace failed)
        nonlocal big
        if big is None:
            other = twice() if twice is not None else None
            big = graph_outputs(inline_regions(other)) if other is not None else []
        return big[j] if j < len(big) else None

    def grows(j: int) -> Callable[[Any], bool]:  # whether the reduced value of output j doubles in ``twice()``
        def check(node: Any) -> bool:
            other = bigger(j)
            return other is not None and _numel(walk_chain(other)[0]) == 2 * (_numel(node) or -1)
        return check

    for j, v in enumerate(values):
        val = v.meta.get("val") if isinstance(v, fx.Node) else None
        found = graph_reduction(v, mb, grows=grows(j)) if isinstance(val, torch.Tensor) else None
        divisors = count_divisors(v) if found == "mean" else []
        if divisors and graph_reduction(v, mb, frozenset(divisors), grows(j)) == "sum" and twice is not None:
            # a mean only by an int divisor: a literal ("/ 2") or a baked count ("/ x.shape[0]")? The trace of
            # a batch twice as large tells: a count doubles there, a literal stays
            if (other := bigger(j)) is not None:
                kept = {a for a, b in zip(divisors, count_divisors(other)) if a == b}
                found = graph_reduction(v, mb, frozenset(kept), grows(j))
        if found == "sum" and 1 in mb.rows and _int_divisors(v):
            # one row: ``x.sum() / x.shape[0]`` (a mean) divides by 1 as ``/ 1`` would, and ``/ x.numel()`` by what a
            # literal may be; the trace of two rows tells, where a count doubles and a literal stays
            found = _settle_one_row(v, mb, bigger(j) if twice is not None else None)
        if _is_number(v) and twice is not None and _is_number(other := bigger(j)) and other != v:
            # a number the trace took from the batch's size: a count (x.shape[0], 3 * B) doubles with it and adds
            # up over micro-batches; anything else (B * 2 + 1, B // 2 + 1) no micro-batch values can rebuild
            found = "sum" if other == 2 * v else "derived"
        if isinstance(val, torch.SymInt) and _scales_with_batch(val.node.expr, mb.symbols):
            found = "sum"  # a dynamic trace's count (x.shape[0], x.numel()): twice the batch, twice the value
        if found is None and isinstance(val, torch.Tensor) and mb.inputs is not None and not _reaches(v, mb.inputs) \
                and not any(isinstance(d, int) and d in mb.rows for d in val.shape):
            found = "same"  # no batched input reaches it, and no dim has a micro-batch's size (a baked ones(B, 1))
            if twice is not None and (mine := constant_value(v)) is not None:  # torch.tensor(x.shape[0]): the size
                other = constant_value(bigger(j))
                if other is not None and other != mine:
                    found = "sum" if other == tuple(2 * c for c in mine) else "derived"
        elif found is None and isinstance(val, torch.Tensor) and mb.inputs is not None and _reaches(v, mb.inputs) \
                and (val.dim() == 0 or (is_flat(v, mb.rows) and not grows(j)(v))):
            found = "unknown"  # the batch is gone, by ops that micro-batch values cannot rebuild (max, var, norm)
        out.append(found)
    return out


def _settle_one_row(node: Any, mb: MicroBatch, other: Any) -> str:
    """The reduction of a sum divided by ints (``node``, traced on micro-batches of one row), read off ``other``, the
    same output traced on two rows: a divisor that stayed is a literal, one that doubled a count. "ambiguous"
    when there is no such trace (it failed, or the trace is dynamic) or it says neither."""
    if other is None:
        return "ambiguous"
    kept = {a for a, b in zip(_int_divisors(node), _int_divisors(other)) if a == b}
    return graph_reduction(other, mb.doubled(), frozenset(kept), lambda _: True) or "ambiguous"


def _int_divisors(node: Any) -> list[int]:
    """The ints the scalar at ``node`` is divided by (:func:`count_divisors`), and those of the terms it adds."""
    node, chain, divisors, found = walk_chain(node)
    if not chain and found is None and aten_op(node)[0] in ("add", "sub"):
        for term in node.args[:2]:
            divisors += _int_divisors(term) if isinstance(term, fx.Node) else []
    return divisors


def _scales_with_batch(expr: Any, symbols: frozenset[Any]) -> bool:
    """Whether sympy ``expr`` doubles when the batch sizes in ``symbols`` it uses double (``s0``, ``s0 * s1``)."""
    used = [b for b in symbols if b in getattr(expr, "free_symbols", ())]
    if not used:
        return False
    try:
        return bool((expr.subs({b: 2 * b for b in used}, simultaneous=True) - 2 * expr).expand() == 0)
    except Exception:  # an expression sympy cannot rewrite (floor division, ...): not a plain count
        return False


def _numel(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return int(val.numel()) if isinstance(val, torch.Tensor) and isinstance(val.numel(), int) else None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def divides_by_count(gm: fx.GraphModule, mb: MicroBatch) -> bool:
    """Whether ``gm`` divides by an int equal to one of the micro-batch's counts (``x / x.shape[0]`` traced; on one
    row, any count it may be): run on a batch of several micro-batches at once, it would still divide by one
    micro-batch's count.

        >>> from pippy import pipeline
        >>> class Net(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x / x.shape[0]
        >>> pipe = pipeline(Net(), 2, (torch.ones(4, 3),))
        >>> divides_by_count(pipe.get_stage_module(0), MicroBatch.of([(torch.ones(2, 3), 0)]))
        True
    """
    for node in inline_regions(gm).graph.nodes:
        name, schema = aten_op(node)
        if schema is not None and name == "div" and len(node.args) > 1 and is_int(node.args[1]) \
                and node.args[1] in mb.counts | mb.ones:  # one row: a count and a literal look alike, taken as a count
            return True
    return False


def _reaches(node: Any, inputs: frozenset[str] | None) -> bool:
    """Whether one of the placeholders named ``inputs`` (any placeholder when None) flows into ``node``."""
    seen: set[Any] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and (inputs is None or n.name in inputs):
            return True
        todo.extend(n.all_input_nodes)
    return False


_PASS = ("lift_fresh_copy", "detach", "detach_", "clone", "_to_copy", "alias")


def constant_value(node: Any, limit: int = 16) -> tuple[float, ...] | None:
    """The values of a small tensor the trace baked in as a constant (``torch.tensor(n)``, ``torch.full((), n)``),
    or None when ``node`` is computed from anything else.

        >>> from pippy.frontend.trace import export_module
        >>> class Net(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * 2, torch.tensor(x.shape[0]), torch.full((), x.shape[0] * 2.0)
        >>> [constant_value(v) for v in graph_outputs(export_module(Net(), (torch.ones(4, 2),)).module())]
        [None, (4.0,), (8.0,)]
    """
    while isinstance(node, fx.Node) and node.op == "call_function" and aten_op(node)[0] in _PASS and node.args:
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        owner = node.graph.owning_module
        try:
            value = owner.get_buffer(str(node.target)) if owner is not None else None
        except AttributeError:
            value = getattr(owner, str(node.target), None)
        if isinstance(value, torch.Tensor) and value.numel() <= limit:
            return tuple(float(v) for v in value.detach().flatten().tolist())
        return None
    if node.op == "call_function" and aten_op(node)[0] in ("full", "scalar_tensor") and node.args:
        fill = node.args[-1] if aten_op(node)[0] == "full" else node.args[0]
        size = node.args[0] if aten_op(node)[0] == "full" else []
        if isinstance(fill, int | float) and not isinstance(fill, bool) and isinstance(size, list | tuple) \
                and math.prod(size) <= limit and all(isinstance(d, int) for d in size):
            return (float(fill),) * math.prod(size)
    return None


def graph_outputs(gm: fx.GraphModule) -> list[Any]:
    """The flat outputs of ``gm``'s graph: nodes, or the plain values the trace baked in.

        >>> from pippy.frontend.trace import export_module
        >>> class Net(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * 2, x.shape[0] + 1
        >>> [str(v) for v in graph_outputs(export_module(Net(), (torch.ones(4, 2),)).module())]
        ['mul', '5']
    """
    values = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    return list(values) if isinstance(values, tuple | list) else [values]

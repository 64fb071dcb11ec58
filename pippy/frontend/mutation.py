"""In-place writes in a traced graph: whether an op overwrites a value (or a view of it) after a given node.

``torch.export`` keeps in-place ops (``relu_``, ``mul_``, ``x[:, :3] = 0`` as ``slice`` then
``fill_``/``copy_``). A value written in place after a node read it is, at run time, no longer the
value that node saw, and autograd's node for it changes (``y.relu_()`` makes ``y``'s gradient the
one after the ReLU). Code that keeps such a value for later (the weight-gradient taps of split
backward) or hands it to autograd as a leaf (a stage's received input) must know.

    >>> import torch
    >>> from pippy import pipeline
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ...     def forward(self, x):
    ...         y = self.a(x)
    ...         y[:, :1] = 0  # a write through a view of y
    ...         return self.b(y)
    >>> gm = pipeline(Net(), 1, (torch.ones(1, 2),)).get_stage_module(0)
    >>> nodes = {n.name: n for n in gm.graph.nodes}
    >>> written_after(nodes["linear"]), written_after(nodes["linear_1"]), written_after(nodes["x"])
    (True, False, False)
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx

from pippy.frontend.inline import region_call

__all__ = ["value_read", "written_after", "written_params_across_stages", "written_placeholders"]

_DROPOUTS = ("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")  # CompositeImplicit: may alias


def _arg_slots(node: fx.Node) -> list[tuple[Any, Any]]:
    """(schema argument or None, value) for every argument of ``node``; list arguments are spread."""
    schema = node.target._schema if isinstance(node.target, torch._ops.OpOverload) else None
    named = {a.name: a for a in schema.arguments} if schema is not None else {}
    out: list[tuple[Any, Any]] = []
    for i, v in enumerate(node.args):
        arg = schema.arguments[i] if schema is not None and i < len(schema.arguments) else None
        out += [(arg, x) for x in (v if isinstance(v, list | tuple) else [v])]
    for k, v in node.kwargs.items():
        out += [(named.get(k), x) for x in (v if isinstance(v, list | tuple) else [v])]
    return out


def _effect(user: fx.Node, value: fx.Node) -> tuple[bool, bool]:
    """How ``user`` treats ``value`` among its arguments: (may write into it, its output aliases it).

    An op without a schema (a higher-order op, a submodule call) is assumed to write: the callers
    then take the safe path.
    """
    if user.op == "output":
        return False, False
    if user.op == "call_function" and user.target is operator.getitem:
        return False, True  # an element of a tuple of views (split, unbind, ...) is one of them
    region = region_call(user) if user.op == "call_function" else None
    if region is not None:  # an autocast / no_grad block of forward: what its ops do to the operand
        sub, operands = region
        inner = [n for n in sub.graph.nodes if n.op == "placeholder"]
        slots = [inner[k] for k, v in enumerate(operands) if v is value and k < len(inner)]
        return any(written_after(n) for n in slots), any(_reaches_output(n) for n in slots)
    if user.op != "call_function" or not isinstance(user.target, torch._ops.OpOverload):
        return True, False
    if _passes_through(user) and user.args and user.args[0] is value:
        return False, True
    writes = aliases = False
    returns_alias = any(r.alias_info is not None for r in user.target._schema.returns)
    for arg, v in _arg_slots(user):
        if v is value and arg is not None and arg.alias_info is not None:
            writes |= bool(arg.alias_info.is_write)
            aliases |= returns_alias
    return writes, aliases


def _uses(node: fx.Node, follow_writes: bool = True) -> Iterator[tuple[fx.Node, bool, bool]]:
    """``(user, writes, aliases)`` for every op using ``node``'s value, then the users of the views it makes (and, with
    ``follow_writes``, of what an in-place op returns: its now written input), each user once per value it reads."""
    seen, todo = {node}, [node]
    while todo:
        v = todo.pop()
        for u in v.users:
            writes, aliases = _effect(u, v)
            yield u, writes, aliases
            if (aliases or (follow_writes and writes)) and u not in seen:
                seen.add(u)
                todo.append(u)


def _reaches_output(node: fx.Node) -> bool:
    """Whether the graph returns ``node``'s value or a view of it (then the caller's result aliases it)."""
    return any(u.op == "output" for u, _, _ in _uses(node))


def _passes_through(node: fx.Node) -> bool:
    """Whether ``node`` is a dropout that returns its input itself, which its schema does not say: in eval mode (as
    traced, or as :func:`pippy.frontend.trainmode.follow_modes` set it since) or with ``p`` 0."""
    name = node.target._schema.name.split("::")[-1] if isinstance(node.target, torch._ops.OpOverload) else ""
    if name not in _DROPOUTS:
        return False
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else None)
    train = node.kwargs.get("train", node.args[2] if len(node.args) > 2 else None)
    return train is not True or p == 0 or not isinstance(p, int | float)


def written_after(node: fx.Node, after: fx.Node | None = None) -> bool:
    """Whether some op writes in place into ``node``'s value, or a view of it, later than ``after``.

    ``after`` defaults to ``node`` itself (any write at all after the value exists).
    """
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    start = order[after if after is not None else node]
    return any(writes and order[u] > start for u, writes, _ in _uses(node))


def value_read(node: fx.Node) -> bool:
    """Whether some op computes from ``node``'s value (or a view of it, or what an in-place op left in it), or the
    graph returns it; writes alone (``buf.copy_(new)``, ``count.add_(1)`` that nothing reads) are not reads. An op
    without a schema counts as a read.

        >>> import torch
        >>> g = torch.fx.Graph()
        >>> count, ema, x = g.placeholder("count"), g.placeholder("ema"), g.placeholder("x")
        >>> _ = g.call_function(torch.ops.aten.add_.Tensor, (count, 1))
        >>> decayed = g.call_function(torch.ops.aten.mul_.Tensor, (ema, 0.9))
        >>> _ = g.output(g.call_function(torch.ops.aten.mul.Tensor, (x, decayed)))
        >>> value_read(count), value_read(ema)
        (False, True)
    """
    # a user that does not return an alias computes from it (or writes without returning it: an op we cannot follow)
    return any(u.op == "output" or not aliases for u, _, aliases in _uses(node, follow_writes=False))


def written_placeholders(gm: fx.GraphModule | fx.Graph) -> list[int]:
    """Positions of the inputs of graph ``gm`` that some op writes in place (a stage must not hand those to
    autograd as leaves, nor write into a tensor another stage still holds). Read again after the graph's modes
    change: a dropout in eval mode returns its input, so a write into its result writes the input.

        >>> import torch
        >>> from pippy import pipeline
        >>> net = torch.nn.Sequential(torch.nn.ReLU(inplace=True), torch.nn.Linear(2, 2))
        >>> written_placeholders(pipeline(net, 1, (torch.ones(1, 2),)).get_stage_module(0))
        [0]
    """
    graph = gm if isinstance(gm, fx.Graph) else gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    return [i for i, n in enumerate(inputs) if written_after(n)]


def written_params_across_stages(gm: fx.GraphModule, assignment: dict[fx.Node, int]) -> dict[str, list[int]]:
    """The parameters that forward writes in place (``nn.Embedding(max_norm=...)``'s renorm) and that several
    stages read, each with those stages: each stage holds its own copy, so one stage's write misses the others."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    found: dict[str, list[int]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) in params and _surely_written(node):
            stages = sorted({assignment[u] for u in node.users if u in assignment})
            if len(stages) > 1:
                found[str(node.target)] = stages
    return found


def _surely_written(node: fx.Node) -> bool:
    """Whether an op whose schema says so writes into ``node``'s value or a view of it (a higher-order op or a
    submodule call taking it, which :func:`written_after` assumes writes, is not counted here)."""
    seen, todo = {node}, [node]
    while todo:
        v = todo.pop()
        for u in v.users:
            if u.op != "call_function" or not (isinstance(u.target, torch._ops.OpOverload) or u.target is operator.getitem):
                continue
            writes, aliases = _effect(u, v)
            if writes:
                return True
            if aliases and u not in seen:
                seen.add(u)
                todo.append(u)
    return False


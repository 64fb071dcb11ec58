"""A graph with its autocast and grad-mode regions inlined, for reading what the model computes (not for running).

``torch.export`` keeps the body of a ``with torch.autocast(...)`` or ``with torch.no_grad()`` block inside
``forward`` as a subgraph called by a higher-order op (``wrap_with_autocast``, ``wrap_with_set_grad_enabled``).
Readers that follow a value back through the graph (how a loss reduces the batch, what a loss counts) stop at such a
call. :func:`inline_regions` gives a copy where each region's ops stand in the graph itself, fed by the call's
operands, so the readers see a loss computed under ``torch.autocast`` like any other. The copy drops the regions'
modes: it is for reading the graph's structure and for ops whose result no mode changes (counting targets).

    >>> import torch
    >>> from pippy.frontend.trace import export_module
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x):
    ...         with torch.autocast("cpu", dtype=torch.bfloat16):
    ...             return torch.nn.functional.cross_entropy(x, x.argmax(-1))
    >>> gm = export_module(Net(), (torch.randn(4, 3),)).module()
    >>> "cross_entropy_loss" in [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    False
    >>> flat = inline_regions(gm)
    >>> "cross_entropy_loss.default" in [n.target.__name__ for n in flat.graph.nodes if n.op == "call_function"]
    True
"""

from __future__ import annotations

import operator
from typing import Any

from torch import fx

__all__ = ["inline_regions", "region_call"]

_REGIONS = frozenset({"wrap_with_autocast", "wrap_with_set_grad_enabled"})


def inline_regions(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` itself when it calls no region; else a copy (sharing ``gm``'s tensors) with every region inlined."""
    if not isinstance(gm, fx.GraphModule) or not any(_region(gm, n) for n in gm.graph.nodes):
        return gm
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    _copy(gm, gm, graph, env, "", None)
    return fx.GraphModule(gm, graph)


def region_call(node: fx.Node) -> tuple[fx.GraphModule, list[Any]] | None:
    """The subgraph module a region call (``with torch.autocast`` / ``torch.no_grad`` in forward) runs and its
    operands, or None for other nodes."""
    mod = node.graph.owning_module
    region = _region(mod, node) if mod is not None else None
    return None if region is None else (_attr(mod, region[0]), region[1])


def _region(mod: Any, node: fx.Node) -> tuple[str, list[Any]] | None:
    """The target of the subgraph module a region call runs and its operands; None for other nodes."""
    if node.op != "call_function" or getattr(node.target, "__name__", None) not in _REGIONS:
        return None
    for k, arg in enumerate(node.args):
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and isinstance(_attr(mod, str(arg.target)),
                                                                            fx.GraphModule):
            return str(arg.target), list(node.args[k + 1:])
    return None


def _copy(root: fx.GraphModule, mod: fx.GraphModule, graph: fx.Graph, env: dict[fx.Node, Any], prefix: str,
          inputs: list[Any] | None) -> list[Any]:
    """Copy ``mod``'s graph into ``graph`` (its placeholders fed by ``inputs``, or kept at the top), regions inlined
    recursively; returns what its output returns (the top's output is copied)."""
    placeholders = 0
    for node in mod.graph.nodes:
        if node.op == "placeholder":
            if inputs is None:
                env[node] = graph.node_copy(node)
            else:
                env[node] = inputs[placeholders]
            placeholders += 1
        elif node.op == "output":
            if inputs is None:
                graph.node_copy(node, lambda n: env[n])
                return []
            values = fx.node.map_arg(node.args[0], lambda n: env[n])
            return list(values) if isinstance(values, tuple | list) else [values]
        elif node.op == "get_attr":
            if isinstance(_attr(mod, str(node.target)), fx.GraphModule) and all(_region(mod, u) for u in node.users):
                continue  # a region's subgraph: its ops come inline
            env[node] = graph.get_attr(prefix + str(node.target))
            env[node].meta = dict(node.meta)
        elif (region := _region(mod, node)) is not None:
            target, operands = region
            sub = _attr(mod, target)
            env[node] = _copy(root, sub, graph, env, prefix + target + ".",
                              [fx.node.map_arg(a, lambda n: env[n]) for a in operands])
        elif node.op == "call_function" and node.target is operator.getitem and isinstance(env.get(node.args[0]),
                                                                                          list):
            env[node] = env[node.args[0]][node.args[1]]  # type: ignore[index]
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return []


def _attr(mod: Any, target: str) -> Any:
    obj = mod
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj

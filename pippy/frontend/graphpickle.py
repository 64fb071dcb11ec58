"""Fx graphs as picklable values, so stage modules (every outlined submodule holds a graph) pickle and ``torch.save``.

An ``fx.Graph`` does not pickle: its nodes hold fake tensors (``meta["val"]``) and torch's operator
objects (``aten.batch_norm.default``), which refuse. :func:`graph_state` gives a graph as plain
values: each node with its arguments, each operator by its name under ``torch.ops``, and the node
metadata pippy reads (module stacks, the traced train / eval constants, each value's size as a meta
tensor); :func:`graph_from_state` builds the graph again. :class:`OutlinedModule`, the
``InterpreterModule`` that :mod:`pippy.frontend.outline` makes for every original submodule,
pickles its graph this way (a batch norm's or a dropout's submodule, for instance).

    >>> import pickle, torch
    >>> from torch import fx
    >>> g = fx.Graph()
    >>> x = g.placeholder("x")
    >>> _ = g.output(g.call_function(torch.ops.aten.relu.default, (x,)))
    >>> back = pickle.loads(pickle.dumps(graph_state(g)))
    >>> [n.format_node() for n in graph_from_state(back).nodes] == [n.format_node() for n in g.nodes]
    True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.export.unflatten import InterpreterModule

__all__ = ["GraphState", "OutlinedModule", "graph_from_state", "graph_state"]

_KEPT_META = ("nn_module_stack", "stack_trace", "torch_fn", "pippy_traced_arg")  # plain values pippy reads


@dataclass(frozen=True, slots=True)
class _Ref:
    """A node, by name, in a node's arguments."""

    name: str


@dataclass(frozen=True, slots=True)
class _Op:
    """An operator (``OpOverload``, packet or higher-order op), by its path under ``torch.ops``."""

    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GraphState:
    """A graph as plain values (from :func:`graph_state`): its nodes in order, and its code generator if not fx's own.

        >>> from torch import fx
        >>> g = fx.Graph(); _ = g.output(g.placeholder("x"))
        >>> [n[0] for n in graph_state(g).nodes]
        ['placeholder', 'output']
    """

    nodes: list[tuple[str, str, Any, Any, Any, Any, dict[str, Any]]]
    """Each node's ``(op, name, target, args, kwargs, type, meta)``, other nodes as references by name."""
    codegen: Any
    """The graph's ``_codegen`` when it is not a plain ``fx.graph.CodeGen`` (else ``None``)."""


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return _Ref(value.name)
    if isinstance(value, torch._ops.OpOverload):
        return _Op((value.namespace, value._opname, value._overloadname))
    if isinstance(value, torch._ops.OpOverloadPacket):
        return _Op(tuple(value._qualified_op_name.replace("::", ".").split(".")))
    if isinstance(value, torch._ops.HigherOrderOperator):
        return _Op((value.namespace, value.name()))
    return value


def _meta_tensor(value: Any) -> Any:
    """A tensor value as a meta tensor of its (traced) size; ``None`` when a size has no hint."""
    if isinstance(value, torch.SymInt):
        return value.node.hint if value.node.has_hint() else None
    if not isinstance(value, torch.Tensor):
        return value
    shape = [_meta_tensor(s) for s in value.shape]
    if any(s is None for s in shape):
        return None
    out = torch.empty(shape, dtype=value.dtype, device="meta")
    return out.requires_grad_(value.requires_grad) if out.is_floating_point() or out.is_complex() else out


def _portable_meta(meta: dict[str, Any]) -> dict[str, Any]:
    out = {k: meta[k] for k in _KEPT_META if k in meta}
    if "val" in meta:
        val = fx.node.map_aggregate(meta["val"], _meta_tensor)
        leaves: list[Any] = []
        fx.node.map_aggregate(val, leaves.append)
        if all(v is not None for v in leaves):  # else a size without a hint: left out, as if never traced
            out["val"] = val
    return out


def graph_state(graph: fx.Graph) -> GraphState:
    """``graph`` as plain values that pickle (see the module's example); :func:`graph_from_state` turns them back."""
    nodes = [(n.op, n.name, _encode(n.target), fx.node.map_aggregate(n.args, _encode),
              fx.node.map_aggregate(n.kwargs, _encode), n.type, _portable_meta(n.meta)) for n in graph.nodes]
    codegen = None if type(graph._codegen) is fx.graph.CodeGen else graph._codegen
    return GraphState(nodes=nodes, codegen=codegen)


def graph_from_state(state: GraphState) -> fx.Graph:
    """The graph that :func:`graph_state` described (same nodes, names, arguments and kept metadata).

        >>> from torch import fx
        >>> g = fx.Graph(); _ = g.output(g.placeholder("x"))
        >>> [n.name for n in graph_from_state(graph_state(g)).nodes]
        ['x', 'output']
    """
    graph = fx.Graph()
    if state.codegen is not None:
        graph._codegen = state.codegen
    made: dict[str, fx.Node] = {}

    def decode(value: Any) -> Any:
        if isinstance(value, _Ref):
            return made[value.name]
        if isinstance(value, _Op):
            obj: Any = torch.ops
            for part in value.path:
                obj = getattr(obj, part)
            return obj
        return value

    for op, name, target, args, kwargs, type_expr, meta in state.nodes:
        node = graph.create_node(op, decode(target), fx.node.map_aggregate(args, decode),
                                 fx.node.map_aggregate(kwargs, decode), name=name, type_expr=type_expr)
        node.meta.update(meta)
        made[name] = node
    return graph


class OutlinedModule(InterpreterModule):  # type: ignore[misc]
    """An original submodule of an outlined stage (torch.export's ``InterpreterModule``) that pickles.

    Its graph is pickled as a :class:`GraphState` and its generated code rebuilt on loading; a
    deepcopy copies the graph as ``InterpreterModule`` does.

        >>> import io, torch
        >>> from pippy import pipeline
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).eval()
        >>> stage = pipeline(net, 1, (torch.ones(3, 2),)).build_stage(0, "cpu")
        >>> type(stage.submod.get_submodule("1")).__name__
        'OutlinedModule'
        >>> buf = io.BytesIO(); torch.save(stage.submod, buf); _ = buf.seek(0)
        >>> copy = torch.load(buf, weights_only=False)
        >>> x = torch.randn(3, 2)
        >>> torch.equal(copy(x)[0], stage.submod(x)[0])
        True
    """

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        state["graph"] = graph_state(self.graph)
        state.pop("graph_module", None)  # generated from the graph again on loading
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        graph = graph_from_state(state.pop("graph"))
        super().__setstate__(state)
        self.graph = graph
        graph.owning_module = self
        self.finalize()

    def __deepcopy__(self, memo: dict[int, Any]) -> OutlinedModule:
        res = type(self).__new__(type(self))
        memo[id(self)] = res
        res.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return res

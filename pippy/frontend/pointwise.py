"""Selective recompute: keep only the inputs of each chain of cheap elementwise ops, recompute the chain in backward.

A chain such as GPT-2's tanh GELU (``0.5 * x * (1 + tanh(c * (x + 0.044715 * x**3))))``) makes
autograd save four tensors the size of ``x``; every one of them is a function of ``x`` alone.
:func:`recompute_pointwise` finds such regions in a traced graph (connected pointwise, view,
dtype-cast and reduction ops, and calls of parameter-free activation modules; random ops never),
and replaces each region whose saved bytes exceed its inputs' bytes by one call that saves just
its inputs and runs the region again in backward (:mod:`pippy.frontend.regioncall`). An op that
saves a region's output (the linear after an activation) keeps the region's recipe instead. The
numbers are those of the plain graph: the same ops run on the same values. Matmuls, attention
and norms keep their saved outputs, so recompute costs only elementwise work.

    >>> import torch
    >>> class Gelu(torch.nn.Module):
    ...     def forward(self, x):
    ...         return 0.5 * x * (1.0 + torch.tanh(0.79788456 * (x + 0.044715 * torch.pow(x, 3))))
    >>> flat = torch.export.export(Gelu(), (torch.ones(4, 8),)).module()
    >>> [(r.ops, r.saved_bytes, r.kept_bytes) for r in recompute_pointwise(flat)]
    [(8, 512, 128)]
    >>> x = torch.randn(4, 8, requires_grad=True)
    >>> torch.equal(flat(x), Gelu()(x))
    True
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.export.unflatten import InterpreterModule

from pippy.frontend.regioncall import RegionCall, keep_recipes

__all__ = ["Region", "is_pointwise", "recompute_pointwise", "restore_pointwise"]

_ORIG_GRAPH = "_pippy_graph_without_pointwise_recompute"
_ORIG_FORWARD = "_pippy_forward_without_region_recipes"
_RANDOM = re.compile(r"rand|dropout|bernoulli|normal|uniform|multinomial|poisson|exponential|geometric|cauchy")
_CASTS = {torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout,
          torch.ops.aten.to.device, torch.ops.aten.type_as.default}


@dataclass(frozen=True)
class Region:
    """One recomputed region: where it is, how many ops, and the bytes autograd saved before vs. keeps now
    (per call, at the traced shapes)."""

    module: str
    ops: int
    saved_bytes: int
    kept_bytes: int


def _cheap(node: fx.Node, owner: nn.Module | None = None) -> bool:
    """Elementwise, view, cast or reduction op that returns one tensor and draws no random numbers; or a call of
    a child module of ``owner`` made only of such ops (an activation module), with no tensors and no hooks."""
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    if node.op == "call_module" and owner is not None:
        return _cheap_module(owner.get_submodule(str(node.target)))
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    tags = node.target.tags
    if torch.Tag.nondeterministic_seeded in tags or torch.Tag.inplace_view in tags or _RANDOM.search(node.target.name()):
        return False  # a recomputed random op would draw other numbers
    return (torch.Tag.pointwise in tags or torch.Tag.reduction in tags or node.target.is_view
            or node.target in _CASTS)


def _cheap_module(mod: nn.Module) -> bool:
    graph = getattr(mod, "graph", None)
    if not isinstance(graph, fx.Graph) or any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
        return False
    if mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or getattr(mod, "_backward_pre_hooks", None):
        return False
    return all(n.op in ("placeholder", "output") or _cheap(n, mod) for n in graph.nodes)


def _is_view(node: fx.Node) -> bool:
    """A view, or a cast that may return its input itself (``aten.to`` to the same dtype)."""
    return isinstance(node.target, torch._ops.OpOverload) and (
        node.target.is_view or (node.target in _CASTS and node.target is not torch.ops.aten._to_copy.default))


def _groups(graph: fx.Graph, owner: nn.Module, skip_readers: bool = False) -> list[list[fx.Node]]:
    """Connected components of cheap nodes (graph order inside each); ``skip_readers`` leaves out nodes that read
    a module attribute directly (the taps of a split backward must stay nodes of their own)."""
    parent: dict[fx.Node, fx.Node] = {}

    def find(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in graph.nodes:
        if _cheap(n, owner) and not (skip_readers and any(a.op == "get_attr" for a in n.all_input_nodes)):
            parent[n] = n
            for a in n.all_input_nodes:
                if a in parent:
                    parent[find(a)] = find(n)
    out: dict[fx.Node, list[fx.Node]] = {}
    for n in graph.nodes:
        if n in parent:
            out.setdefault(find(n), []).append(n)
    return list(out.values())


def _boundary(group: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    inside = set(group)
    inputs: list[fx.Node] = []
    for n in group:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in group if any(u not in inside for u in n.users)]
    return inputs, outputs


def _trim(group: list[fx.Node]) -> list[fx.Node]:
    """Drop views that leave the region (a custom autograd op must not return a view of its input), and
    leading views of inputs (they cost nothing to keep outside)."""
    while True:
        inside = set(group)
        _, outputs = _boundary(group)
        drop = {n for n in outputs if _is_view(n)}
        drop |= {n for n in group if _is_view(n) and not any(a in inside for a in n.all_input_nodes)}
        if not drop:
            return group
        group = [n for n in group if n not in drop]


def _convex(group: list[fx.Node], graph: fx.Graph) -> bool:
    """No path leaves the region and comes back (collapsing it to one call would make a cycle)."""
    inside = set(group)
    tainted: set[fx.Node] = set()
    for n in graph.nodes:
        if n in inside:
            if any(a in tainted for a in n.all_input_nodes):
                return False
            continue
        if any(a in inside or a in tainted for a in n.all_input_nodes):
            tainted.add(n)
    return True


def _concrete(v: Any) -> Any:
    """A value at its traced size: SymInts become their hints, fake tensors become meta tensors."""
    if isinstance(v, torch.SymInt):
        return v.node.hint if v.node.has_hint() else None
    if isinstance(v, torch.Tensor):
        shape = [_concrete(s) for s in v.shape]
        if any(s is None for s in shape):
            return None
        t = torch.empty(shape, dtype=v.dtype, device="meta")
        return t.requires_grad_(v.dtype.is_floating_point or v.dtype.is_complex)
    return v


def _subgraph(owner: nn.Module, group: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]
              ) -> fx.GraphModule:
    """The region as a graph module; child modules it calls (activation modules) are shared, not copied."""
    g = fx.Graph()
    root = nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    for i, a in enumerate(inputs):
        env[a] = g.placeholder(f"in_{i}")
        env[a].meta = dict(a.meta)
    for n in group:
        env[n] = g.node_copy(n, lambda a: env[a])
        if n.op == "call_module":
            alias = f"m{len(root._modules)}"
            root.add_module(alias, owner.get_submodule(str(n.target)))
            env[n].target = alias
    g.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(root, g)


def _saved_bytes(fn: fx.GraphModule, inputs: list[fx.Node]) -> tuple[int, int] | None:
    """(bytes autograd saves running ``fn`` plainly, bytes of its tensor inputs), at the traced sizes."""
    args = [_concrete(a.meta.get("val")) if "val" in a.meta else None for a in inputs]
    if any(v is None for v in args):
        return None
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        seen[id(base)] = base.numel() * base.element_size()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*args)
    except Exception:  # an op without a meta kernel: leave the region as it is
        return None
    saved = sum(seen.values())
    kept = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
    return saved, kept


def _place(graph: fx.Graph, group: list[fx.Node], inputs: list[fx.Node]) -> fx.Node | None:
    """Where the region's call goes: after its last input and before its first op's outside users; None if
    graph order leaves no such place."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    inside = set(group)
    after = max((order[a] for a in inputs), default=-1)
    users = [u for n in group for u in n.users if u not in inside]
    if users and min(order[u] for u in users) <= after:
        return None
    return group[0] if order[group[0]] > after else next(n for n in graph.nodes if order[n] == after + 1)


def _rewrite(mod: nn.Module, path: str, graph: fx.Graph, min_bytes: int, skip_readers: bool
             ) -> tuple[fx.Graph, list[Region]]:
    new = copy.deepcopy(graph)
    regions: list[Region] = []
    for group in _groups(new, mod, skip_readers):
        group = _trim(group)
        if len(group) < 2 or not _convex(group, new):
            continue
        inputs, outputs = _boundary(group)
        where = _place(new, group, inputs)
        if where is None or not outputs:
            continue
        fn = _subgraph(mod, group, inputs, outputs)
        sizes = _saved_bytes(fn, inputs)
        if sizes is None or sizes[0] - sizes[1] <= min_bytes:
            continue
        name = f"_pippy_pointwise_{len(regions)}"
        while hasattr(mod, name):
            name += "_"
        label = ", ".join(str(n.target).replace("aten.", "") for n in group[:6]) + (", ..." if len(group) > 6 else "")
        mod.add_module(name, RegionCall(fn, f"{len(group)} ops: {label}"))
        with new.inserting_before(where):
            call = new.call_module(name, tuple(inputs))
            got = [new.call_function(operator.getitem, (call, j)) for j in range(len(outputs))]
        inside = set(group)
        for o, g in zip(outputs, got):
            g.meta = dict(o.meta)
            o.replace_all_uses_with(g, delete_user_cb=lambda u, inside=inside: u not in inside)  # type: ignore[misc]
        for n in reversed(group):
            new.erase_node(n)
        regions.append(Region(path, len(group), sizes[0], sizes[1]))
    new.lint()
    return new, regions


def _set_graph(mod: nn.Module, graph: fx.Graph) -> None:
    if isinstance(mod, InterpreterModule):
        mod.graph = graph
        mod.finalize()  # type: ignore[operator]
    else:
        mod.graph = graph  # type: ignore[assignment]
        mod.recompile()  # type: ignore[operator]


def recompute_pointwise(module: nn.Module, min_bytes: int = 0, *, skip_param_readers: bool = False) -> list[Region]:
    """Rewrite every graph in ``module`` (a traced stage, flat or outlined) to recompute its elementwise regions.

    A region is rewritten when autograd would save more than ``min_bytes`` bytes beyond its inputs.
    ``skip_param_readers`` keeps ops that read a parameter out of regions (split backward's taps).
    Returns what was rewritten; :func:`restore_pointwise` undoes it. Parameters, buffers and
    ``state_dict`` are unchanged.

        >>> import torch
        >>> m = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.ones(2, 4),)).module()
        >>> recompute_pointwise(m)
        []
    """
    regions: list[Region] = []
    # children first: a child that got a region of its own is no longer a plain activation call for its parent
    for path, mod in reversed(list(module.named_modules())):
        graph = getattr(mod, "graph", None)
        if not isinstance(graph, fx.Graph) or isinstance(mod, RegionCall) or _ORIG_GRAPH in mod.__dict__:
            continue
        new, found = _rewrite(mod, path, graph, min_bytes, skip_param_readers)
        if found:
            mod.__dict__[_ORIG_GRAPH] = graph
            _set_graph(mod, new)
            regions += found
    if regions and _ORIG_FORWARD not in module.__dict__:  # ops after a region save its recipe, not its output
        inner = module.forward
        module.__dict__[_ORIG_FORWARD] = inner

        def forward(*args: Any, **kwargs: Any) -> Any:
            with keep_recipes():
                return inner(*args, **kwargs)

        module.forward = forward  # type: ignore[method-assign]
    return regions


def restore_pointwise(module: nn.Module) -> None:
    """Undo :func:`recompute_pointwise` on every graph in ``module``.

        >>> import torch
        >>> restore_pointwise(torch.nn.Linear(1, 1))
    """
    if module.__dict__.pop(_ORIG_FORWARD, None) is not None:
        module.__dict__.pop("forward", None)
    for mod in list(module.modules()):
        graph = mod.__dict__.pop(_ORIG_GRAPH, None)
        if graph is None:
            continue
        for name, child in list(mod.named_children()):
            if isinstance(child, RegionCall):
                delattr(mod, name)
        _set_graph(mod, graph)


def is_pointwise(module: nn.Module) -> bool:
    """Whether :func:`recompute_pointwise` rewrote this module's own graph.

        >>> import torch
        >>> is_pointwise(torch.nn.Linear(1, 1))
        False
    """
    return _ORIG_GRAPH in module.__dict__


def describe(regions: Sequence[Region]) -> str:
    """One line per region: where, how many ops, bytes saved per call."""
    return "\n".join(f"{r.module or '<root>'}: {r.ops} ops, saves {r.saved_bytes - r.kept_bytes} B per call"
                     for r in regions)

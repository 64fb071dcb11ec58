"""Cut a traced graph into stage GraphModules that keep the original FQNs, with any-to-any edges.

Every node gets a stage. Placeholders (the user's flattened inputs) belong to stage 0 and the
graph output to the last stage; a value produced in stage ``a`` and used in stage ``b > a`` becomes
an output of ``a`` and an input of ``b`` (an edge, not only between neighbours). Parameters and
buffers are never sent: every stage that reads one gets its own copy under the same FQN, and a
tensor read by several stages is recorded as shared (tied) so its gradients can be summed.

    >>> from pippy.frontend.trace import SplitPoint, annotate_split_points, export_module
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> annotate_split_points(net, {"0": SplitPoint.END})
    >>> gm = export_module(net, (torch.randn(2, 4),)).module()
    >>> stages = split_graph(gm, assign_by_markers(gm), 2)  # what pippy.pipeline does after tracing
    >>> [sorted(st.module.state_dict()) for st in stages]  # the original FQNs
    [['0.bias', '0.weight'], ['1.bias', '1.weight']]
    >>> stages[0].consumers[0], stages[1].inputs[0]  # stage 0's output 0 is stage 1's input 0
    ([(1, 0)], InputRef(src_stage=0, index=0))
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from pippy.frontend.dynamic import sym_dims, sym_hint
from pippy.frontend.keepbuffers import KeepBuffersGraphModule
from pippy.frontend.params import tensor_at
from pippy.frontend.remat import remat_plan, worth_recomputing
from pippy.frontend.trace import is_split_marker
from pippy.frontend.unread import place_unread

__all__ = ["InputRef", "StageInfo", "ValueMeta", "assign_by_markers", "split_graph"]

USER = -1  # InputRef.src_stage of a user input


@dataclass(frozen=True, slots=True)
class ValueMeta:
    """What travels on an edge: a tensor's shape/dtype/grad flag, or a constant non-tensor value.

        >>> ValueMeta((2, 3), torch.float32, True).numel
        6
    """

    shape: tuple[int, ...] | None  # the traced sizes (those in ``dynamic`` vary per micro-batch)
    dtype: torch.dtype | None
    requires_grad: bool = False
    const: Any = None
    dynamic: tuple[int, ...] = ()  # tensor dims whose size varies (a pipe traced with dynamic_shapes)
    varies: bool = False  # a non-tensor value that varies (a symbolic size): sent, not baked in
    per_mb: bool = False  # a varying size depends on the data (unbacked): it may differ between a step's micro-batches

    def fits(self, shape: tuple[int, ...]) -> bool:
        """True when a tensor of ``shape`` fits: the traced sizes, except in the dynamic dims.

            >>> ValueMeta((2, 3), torch.float32, dynamic=(1,)).fits((2, 7)), ValueMeta((2, 3), torch.float32).fits((2, 7))
            (True, False)
        """
        want = self.shape or ()
        return len(shape) == len(want) and all(a == b or i in self.dynamic for i, (a, b) in enumerate(zip(shape, want)))

    @property
    def is_tensor(self) -> bool:
        """True for a tensor value (False for a constant such as an int or None)."""
        return self.dtype is not None

    @property
    def numel(self) -> int:
        """Number of elements (0 for constants)."""
        n = 1
        for d in self.shape or ():
            n *= d
        return n if self.is_tensor else 0

    @property
    def nbytes(self) -> int:
        """Size in bytes (0 for constants)."""
        return self.numel * self.dtype.itemsize if self.dtype is not None else 0

    def describe(self) -> str:
        """Short human form, e.g. ``f32[4, 16]``."""
        if not self.is_tensor:
            return f"varying {type(self.const).__name__} (traced {self.const!r})" if self.varies else f"const {self.const!r}"
        dims = [("?" if i in self.dynamic else str(d)) for i, d in enumerate(self.shape or ())]
        return f"{str(self.dtype).replace('torch.', '')}[{', '.join(dims)}]"


@dataclass(frozen=True, slots=True)
class InputRef:
    """Where a stage input comes from: output ``index`` of ``src_stage``, or user input ``index``."""

    src_stage: int
    index: int


@dataclass(slots=True)
class StageInfo:
    """One stage of a Pipe: its graph module and its edges.

    ``module(*inputs)`` returns a tuple with one entry per ``outputs``. ``consumers[j]`` lists the
    ``(stage, input_index)`` pairs that read output ``j``; the last stage's outputs are the model's
    flattened outputs.
    """

    index: int
    module: fx.GraphModule
    inputs: list[InputRef]
    input_meta: list[ValueMeta]
    input_names: list[str]
    outputs: list[ValueMeta]
    output_names: list[str]
    consumers: list[list[tuple[int, int]]] = field(default_factory=list)

    @property
    def producer_stages(self) -> tuple[int, ...]:
        """Stages this stage reads from (user inputs excluded)."""
        return tuple(sorted({r.src_stage for r in self.inputs if r.src_stage != USER}))

    @property
    def consumer_stages(self) -> tuple[int, ...]:
        """Stages that read this stage's outputs."""
        return tuple(sorted({s for cons in self.consumers for s, _ in cons}))


def assign_by_markers(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Stage of each compute node = number of ``pipe_split()`` markers before it.

        >>> from pippy.frontend.trace import SplitPoint, annotate_split_points, export_module
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
        >>> annotate_split_points(net, {"1": SplitPoint.END})
        >>> gm = export_module(net, (torch.randn(2, 4),)).module()
        >>> {v.name: s for v, s in assign_by_markers(gm).items() if v.op == "call_function"}
        {'linear': 0, 'relu': 0, 'linear_1': 1}
    """
    stage = 0
    out: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if is_split_marker(node):
            stage += 1
        elif node.op in ("call_function", "call_method", "call_module"):
            out[node] = stage
    return out


def _meta_of(node: Any, requires_grad: bool) -> ValueMeta:
    if not isinstance(node, fx.Node):
        return ValueMeta(None, None, False, node)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        rg = requires_grad and (val.is_floating_point() or val.is_complex())
        return ValueMeta(tuple(sym_hint(d) for d in val.shape), val.dtype, rg, dynamic=sym_dims(val.shape),
                         per_mb=any(free_unbacked_symbols(d) for d in val.shape if isinstance(d, torch.SymInt)))
    if isinstance(val, torch.SymInt | torch.SymFloat | torch.SymBool) and val.node.expr.free_symbols:
        hint = val.node.hint
        return ValueMeta(None, None, False, hint if hint is not None else sym_hint(val), varies=True)
    return ValueMeta(None, None, False, val)


_NO_GRAD_TARGETS = {
    "aten.detach.default",
    "aten.zeros_like.default",
    "aten.ones_like.default",
    "aten.empty_like.default",
    "aten.full_like.default",
    "aten.rand_like.default",
    "aten.randn_like.default",
    "aten.lift_fresh_copy.default",
}


def infer_requires_grad(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """Which node values may carry a gradient (floating output of a node that reads a trainable tensor).

    An over-estimate is safe (a zero gradient is sent); an under-estimate would lose gradients,
    so every op not known to cut the graph propagates.
    """
    rg: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            rg[node] = bool(isinstance(val, torch.Tensor) and val.requires_grad)
        elif node.op == "get_attr":
            obj = tensor_at(gm, str(node.target))
            rg[node] = bool(isinstance(obj, torch.Tensor) and obj.requires_grad)
        elif node.op == "output":
            continue
        elif str(node.target) in _NO_GRAD_TARGETS:
            rg[node] = False
        else:
            rg[node] = any(rg.get(n, False) for n in node.all_input_nodes)
    return rg


def _own_shared(gm: fx.GraphModule, stage_of: dict[fx.Node, int]) -> None:
    """Give each trainable tensor read by several stages one owner: the first stage that reads it.

    Readers through other names (aliases) are re-pointed at the owner's ``get_attr``; the splitter
    then treats that node as a value of the owning stage, sent to later stages like an activation.
    """
    groups: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = tensor_at(gm, str(node.target))
            if isinstance(obj, torch.Tensor) and obj.requires_grad:
                groups.setdefault(id(obj), []).append(node)
    for readers in groups.values():
        users = [u for n in readers for u in n.users if u in stage_of]
        stages = {stage_of[u] for u in users}
        if len(stages) < 2:
            continue
        first = min(stages)
        owner = next(n for n in readers if any(stage_of.get(u) == first for u in n.users))
        for other in readers:
            if other is not owner:
                for u in list(other.users):
                    u.replace_input_with(other, owner)
        stage_of[owner] = first


def _derive_sizes(inputs: list[list[fx.Node]], outputs: list[list[fx.Node]],
                  last: int) -> list[dict[fx.Node, tuple[fx.Node, int]]]:
    """Varying sizes (SymInts) a stage would receive, but can read off one of its tensor inputs instead.

    E.g. the sequence length a later stage uses in a ``view``: the hidden state it receives has it as
    dimension 1. Such a size is dropped from the stage's inputs (and from its producer's outputs when no
    other stage reads it); the stage computes it with ``sym_size``. Returns, per stage, size node ->
    (tensor input node, dim).
    """
    derived: list[dict[fx.Node, tuple[fx.Node, int]]] = [{} for _ in inputs]
    for dst, ins in enumerate(inputs):
        for n in list(ins):
            val = n.meta.get("val")
            if n.op == "placeholder" or not isinstance(val, torch.SymInt) or not val.node.expr.free_symbols:
                continue
            src = next(((t, i) for t in ins if isinstance(tv := t.meta.get("val"), torch.Tensor)
                        for i, d in enumerate(tv.shape) if isinstance(d, torch.SymInt) and d.node.expr == val.node.expr),
                       None)
            if src is not None:
                derived[dst][n] = src
                ins.remove(n)
    for s in range(last):
        outputs[s] = [o for o in outputs[s] if any(o in ins for d, ins in enumerate(inputs) if d != s)]
    return derived


def split_graph(
    gm: fx.GraphModule,
    assignment: Mapping[fx.Node, int],
    num_stages: int,
    *,
    tied_weights: str = "replicate",
    recompute_inputs: bool = True,
) -> list[StageInfo]:
    """Build one GraphModule per stage from ``gm`` and a ``{node: stage}`` assignment.

    Edges may only go forward (producer stage <= consumer stage); a backward edge is an error.
    ``tied_weights``: "replicate" copies a trainable tensor into every stage that reads it (its
    gradients are summed after backward); "transmit" keeps it in the first stage that reads it
    and sends it along each micro-batch like an activation (its gradient comes back the same way).
    ``recompute_inputs``: a value built only from user inputs and constants (an attention mask)
    is rebuilt in the consuming stage when that sends fewer bytes than the value itself.
    """
    if tied_weights not in ("replicate", "transmit"):
        raise ValueError(f"tied_weights must be 'replicate' or 'transmit', got {tied_weights!r}")
    nodes = [n for n in gm.graph.nodes if not is_split_marker(n)]
    last = num_stages - 1
    stage_of: dict[fx.Node, int] = {}
    for n in nodes:
        if n.op == "placeholder":
            stage_of[n] = 0
        elif n.op == "output":
            stage_of[n] = last
        elif n.op != "get_attr":
            s = assignment.get(n)
            if s is None or not 0 <= s < num_stages:
                raise ValueError(f"node {n.name} ({n.target}) has no stage in 0..{last} (got {s})")
            stage_of[n] = s
    for n in nodes:  # a tuple never crosses: its getitem users join the producer (a free op)
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
            src = n.args[0]
            if src in stage_of and n in stage_of and stage_of[src] < stage_of[n]:
                stage_of[n] = stage_of[src]
    if tied_weights == "transmit":
        _own_shared(gm, stage_of)
    rg = infer_requires_grad(gm)

    # Pass 1: which values cross stages (or are rebuilt in the consumer, see remat.py).
    outputs: list[list[fx.Node]] = [[] for _ in range(num_stages)]
    inputs: list[list[fx.Node]] = [[] for _ in range(num_stages)]
    rebuilt: list[set[fx.Node]] = [set() for _ in range(num_stages)]

    def need(src_node: fx.Node, dst: int, user: fx.Node) -> None:
        if src_node.op == "get_attr" and src_node not in stage_of:
            return  # copied into each stage that reads it
        src = stage_of[src_node]
        if src == dst or src_node in rebuilt[dst]:
            return
        if isinstance(src_node.meta.get("val"), list | tuple):
            raise ValueError(
                f"stage {dst} reads {src_node.name} ({src_node.target}), a tuple of values made in stage {src}; only "
                "tensors and Python scalars can cross stages. Move the split point so the tuple is unpacked in the "
                "stage that makes it."
            )
        if src > dst:
            raise ValueError(
                f"backward edge: {src_node.name} is computed in stage {src} but used by {user.name} in stage {dst}; "
                "stages must be contiguous in graph order"
            )
        plan = remat_plan(src_node, rg) if recompute_inputs else None
        if plan is not None and worth_recomputing(src_node, plan[1], set(inputs[dst])):
            rebuilt[dst].update(plan[0])
            for leaf in plan[1]:
                need(leaf, dst, src_node)
            return
        if src_node not in outputs[src]:
            outputs[src].append(src_node)
        if src_node not in inputs[dst]:
            inputs[dst].append(src_node)

    for n in nodes:
        if n in stage_of:
            for src_node in n.all_input_nodes:
                need(src_node, stage_of[n], n)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    inputs[0] = placeholders + [n for n in inputs[0] if n.op != "placeholder"]
    derived = _derive_sizes(inputs, outputs, last)

    # Pass 2: build graphs.
    infos: list[StageInfo] = []
    out_node = next(n for n in nodes if n.op == "output")
    for s in range(num_stages):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        refs: list[InputRef] = []
        for src_node in inputs[s]:
            env[src_node] = g.placeholder(src_node.name)
            env[src_node].meta = dict(src_node.meta)
            if s == 0 and src_node.op == "placeholder":
                refs.append(InputRef(USER, placeholders.index(src_node)))
            else:
                p = stage_of[src_node]
                refs.append(InputRef(p, outputs[p].index(src_node)))

        for size_node, (tensor_node, dim) in derived[s].items():  # a varying size read off a tensor input
            env[size_node] = g.call_function(torch.ops.aten.sym_size.int, (env[tensor_node], dim))
            env[size_node].meta = dict(size_node.meta)

        def lookup(x: fx.Node, _env: dict[fx.Node, fx.Node] = env, _g: fx.Graph = g) -> fx.Node:
            if x not in _env and x.op == "get_attr":
                _env[x] = _g.get_attr(str(x.target))
                _env[x].meta = dict(x.meta)
            return _env[x]

        for n in nodes:
            if (stage_of.get(n) == s or n in rebuilt[s]) and n.op not in ("placeholder", "output"):
                env[n] = g.node_copy(n, lookup)
        if s == last:
            flat_out = out_node.args[0]
            res = fx.node.map_arg(flat_out, lookup)
            g.output(tuple(res) if isinstance(res, list | tuple) else (res,))
            out_vals = list(flat_out) if isinstance(flat_out, list | tuple) else [flat_out]
            out_meta = [_meta_of(v, rg.get(v, False) if isinstance(v, fx.Node) else False) for v in out_vals]
            out_names = [v.name if isinstance(v, fx.Node) else repr(v) for v in out_vals]
        else:
            g.output(tuple(env[o] for o in outputs[s]))
            out_meta = [_meta_of(o, rg.get(o, False)) for o in outputs[s]]
            out_names = [o.name for o in outputs[s]]
        g.lint()
        mod = KeepBuffersGraphModule(gm, g, class_name=f"submod_{s}")
        infos.append(
            StageInfo(
                index=s,
                module=mod,
                inputs=refs,
                input_meta=[_meta_of(n, rg.get(n, False)) for n in inputs[s]],
                input_names=[n.name for n in inputs[s]],
                outputs=out_meta,
                output_names=out_names,
                consumers=[[] for _ in out_meta],
            )
        )
    for info in infos:
        for k, ref in enumerate(info.inputs):
            if ref.src_stage != USER:
                infos[ref.src_stage].consumers[ref.index].append((info.index, k))
    place_unread(gm, [info.module for info in infos])
    return infos

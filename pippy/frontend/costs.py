"""Per-node costs of a traced graph for the split policies: measured time, estimated FLOPs or parameter bytes.

    >>> import torch
    >>> from pippy.frontend.trace import export_module
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    >>> x = torch.randn(2, 4)
    >>> gc = graph_costs(export_module(net, (x,)).module(), [x], "flops")
    >>> {v.name: float(c) for v, c in zip(gc.nodes, gc.cost) if c}  # gc.cost[i] is node gc.nodes[i]'s cost
    {'linear': 64.0, 'relu': 8.0, 'linear_1': 64.0}

``graph_costs`` returns the compute nodes in topological order with, for each, its cost, the bytes
of the parameters/buffers it reads, plus the cut data the partitioners need: ``live_bytes[k]`` is
the size of the values that cross a cut placed before node ``k`` (produced before ``k``, used at or
after it; user inputs count as produced before node 0, the graph output as a use after the last
node) and ``cuttable[k]`` is False where a value that cannot be sent (a list of tensors, say) would
cross that cut. ``tail`` is cost outside the graph that the last stage bears: for ``"time"``, a
softmax-cross-entropy-like loss over the floating outputs (forward + backward), since pipelines
compute the loss on the last stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

from pippy.frontend.dynamic import sym_hint
from pippy.frontend.nodetimes import COMPUTE_OPS, loss_time, measure_node_times
from pippy.frontend.params import tensor_at

__all__ = ["COMPUTE_OPS", "COST_KINDS", "GraphCosts", "graph_costs", "measure_node_times", "node_flops", "value_nbytes"]

COST_KINDS: dict[str, str] = {
    "time": "s",
    "flops": "FLOP",
    "params": "B",
}
"""Cost kinds a policy accepts, with the unit of each (time: measured forward + backward seconds)."""

COST_META = "pippy_cost"
"""``node.meta`` key where policies record ``(kind, cost)`` so ``split_report`` can sum it per stage."""
TAIL_META = "pippy_tail_cost"
"""``node.meta`` key holding ``GraphCosts.tail`` (the same on every node); the report adds it to the last stage."""

_FREE = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "slice", "select", "unsqueeze",
    "squeeze", "detach", "alias", "as_strided", "unflatten", "flatten", "split", "chunk", "unbind", "getitem",
    "_assert_tensor_metadata", "lift_fresh_copy", "sym_size", "dropout", "expand_as", "view_as", "narrow",
}


@dataclass(slots=True)
class GraphCosts:
    """Costs of the compute nodes of one traced graph, in topological order (see the module docstring).

        >>> import torch
        >>> from pippy.frontend.trace import export_module
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> x = torch.randn(2, 4)
        >>> gc = graph_costs(export_module(net, (x,)).module(), [x], "params")
        >>> gc.unit, float(gc.cost.sum()), bool((gc.cost == gc.param_bytes).all())  # 2 x (16 + 4) float32
        ('B', 160.0, True)
    """

    nodes: list[fx.Node]
    cost: np.ndarray
    param_bytes: np.ndarray
    live_bytes: np.ndarray
    cuttable: np.ndarray
    kind: str
    tail: float = 0.0

    @property
    def unit(self) -> str:
        """Unit of ``cost`` (``s``, ``FLOP`` or ``B``)."""
        return COST_KINDS[self.kind]

    def record(self) -> None:
        """Store each node's cost in ``node.meta`` so stage modules (which copy meta) can report it."""
        for node, c in zip(self.nodes, self.cost):
            node.meta[COST_META] = (self.kind, float(c))
            node.meta[TAIL_META] = self.tail


def _op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", str(t))
    return name.split(".")[0]


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def _shape(x: Any) -> tuple[int, ...]:
    v = _val(x)
    return tuple(sym_hint(d) for d in v.shape) if isinstance(v, torch.Tensor) else ()


def _numel(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return sym_hint(v.numel())  # the traced size: int() of a symbolic size would fix it in the trace
    if isinstance(v, list | tuple):
        return sum(_numel(x) for x in v)
    return 0


def value_nbytes(v: Any) -> int:
    """Bytes of a tensor, of a nested list/tuple/dict of tensors, or of an ``fx.Node``'s traced value.

    A node counts as its ``node.meta["val"]`` (the FakeTensor torch.export recorded); anything
    else (an int, None, a SymInt, a node without a traced value) is 0 bytes.

        >>> import torch
        >>> value_nbytes(torch.zeros(2, 3))  # 6 float32
        24
        >>> value_nbytes([torch.zeros(2), {"mask": torch.zeros(1, dtype=torch.int64)}, "text", 3])
        16
        >>> from pippy.frontend.trace import export_module
        >>> gm = export_module(torch.nn.Linear(4, 2), (torch.randn(3, 4),)).module()
        >>> [value_nbytes(v) for v in gm.graph.nodes if v.op == "call_function"]  # the [3, 2] output
        [24]
    """
    if isinstance(v, fx.Node):
        v = v.meta.get("val")
    if isinstance(v, torch.Tensor):
        return sym_hint(v.numel()) * v.element_size()
    if isinstance(v, list | tuple):
        return sum(value_nbytes(x) for x in v)
    if isinstance(v, dict):
        return sum(value_nbytes(x) for x in v.values())
    return 0


def node_flops(node: fx.Node) -> float:
    """Forward FLOPs of one aten node from its FakeTensor metadata (a multiply-add counts 2).

    Matrix products count ``2 * out_numel * k``, attention ``2 * B*L*S*(E+Ev)``, a convolution
    ``2 * out_numel * (C_in/groups * kernel)``, views 0, anything else one FLOP per output element.

        >>> import torch
        >>> from pippy.frontend.trace import export_module
        >>> gm = export_module(torch.nn.Linear(4, 3), (torch.randn(2, 4),)).module()
        >>> linear = next(v for v in gm.graph.nodes if v.name == "linear")
        >>> node_flops(linear)  # 2 * batch * out_features * in_features
        48.0
    """
    if node.op not in COMPUTE_OPS:
        return 0.0
    name = _op_name(node)
    out = _numel(node.meta.get("val"))
    if name in _FREE:
        return 0.0
    args = node.args
    if name in ("linear", "mm", "bmm", "matmul"):
        k = _shape(args[0])[-1] if _shape(args[0]) else 1
        return 2.0 * out * k
    if name in ("addmm", "baddbmm", "addbmm"):
        k = _shape(args[1])[-1] if _shape(args[1]) else 1
        return 2.0 * out * k + out
    if name in ("convolution", "conv1d", "conv2d", "conv3d", "_convolution"):
        w = _shape(args[1])
        groups = node.kwargs.get("groups", args[-1] if name == "convolution" and len(args) > 8 else 1)
        groups = groups if isinstance(groups, int) else 1
        per_out = w[1] * int(np.prod(w[2:])) if len(w) > 2 else 1  # C_in/groups * kernel
        transposed = name == "convolution" and len(args) > 6 and bool(args[6])
        if transposed:
            per_out = w[0] // max(groups, 1) * int(np.prod(w[2:]))
        return 2.0 * out * per_out
    if name in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention"):
        qs, ks, vs = (_shape(a) for a in args[:3])
        if len(qs) >= 2 and len(ks) >= 2 and len(vs) >= 1:
            batch = int(np.prod(qs[:-2]))
            return 2.0 * batch * qs[-2] * ks[-2] * (qs[-1] + vs[-1])
    if name in ("embedding", "index_select", "gather", "index"):
        return float(out)
    return float(out)


def _param_bytes(gm: fx.GraphModule, node: fx.Node, cache: dict[str, int]) -> int:
    total = 0
    for src in node.all_input_nodes:
        if src.op == "get_attr":
            key = str(src.target)
            if key not in cache:
                obj = tensor_at(gm, key)
                cache[key] = value_nbytes(obj)
            total += cache[key]
    return total


def _liveness(graph: fx.Graph, index: dict[fx.Node, int], n: int) -> tuple[np.ndarray, np.ndarray]:
    live = np.zeros(n + 2, dtype=np.float64)
    bad = np.zeros(n + 2, dtype=np.int64)
    for node in graph.nodes:
        if node.op in ("get_attr", "output"):
            continue
        p = -1 if node.op == "placeholder" else index[node]
        last = max((n if u.op == "output" else index.get(u, -1) for u in node.users), default=-1)
        if last <= p:
            continue
        val = node.meta.get("val")
        # a cut k in (p, last] separates the producer from a user
        if isinstance(val, torch.Tensor):
            live[p + 1] += value_nbytes(val)
            live[last + 1] -= value_nbytes(val)
        elif isinstance(val, list | tuple) and node.op != "placeholder":
            bad[p + 1] += 1
            bad[last + 1] -= 1
    return np.cumsum(live)[: n + 1], np.cumsum(bad)[: n + 1] == 0


def graph_costs(
    gm: fx.GraphModule, example_inputs: Sequence[Any], kind: str = "flops", *, repeats: int = 5, loss_tail: bool = True
) -> GraphCosts:
    """Cost every compute node of ``gm``; ``kind`` is ``"time"``, ``"flops"`` or ``"params"``.

    ``"time"`` runs the graph node by node on the real example inputs and parameters: the median
    forward time of ``repeats`` runs plus the median time autograd spends in the node's backward.
    Buffers and the RNG state are restored afterwards and no ``.grad`` is touched. With
    ``loss_tail`` the time of a log-softmax loss over the outputs becomes ``tail`` (see above).

    ``gm`` is the graph ``pippy.pipeline`` traces (``export_module(...).module()``) and
    ``example_inputs`` its flat inputs for one micro-batch.

        >>> import torch
        >>> from pippy.frontend.trace import export_module
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
        >>> x = torch.randn(2, 4)
        >>> gc = graph_costs(export_module(net, (x,)).module(), [x], "time", repeats=1)
        >>> gc.unit, bool((gc.cost >= 0).all()), gc.tail > 0  # seconds for one micro-batch fwd + bwd, + the loss
        ('s', True, True)
    """
    if kind not in COST_KINDS:
        raise ValueError(f"unknown cost kind {kind!r}; use one of {sorted(COST_KINDS)}")
    nodes = [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]
    index = {n: i for i, n in enumerate(nodes)}
    cache: dict[str, int] = {}
    pbytes = np.array([_param_bytes(gm, n, cache) for n in nodes], dtype=np.float64)
    if kind == "flops":
        cost = np.array([node_flops(n) for n in nodes], dtype=np.float64)
    elif kind == "params":
        cost = pbytes.copy()
    else:
        times = measure_node_times(gm, example_inputs, repeats)
        cost = np.array([times.get(n, 0.0) for n in nodes], dtype=np.float64)
    tail = loss_time(gm, example_inputs, repeats) if kind == "time" and loss_tail else 0.0
    live, cuttable = _liveness(gm.graph, index, len(nodes))
    return GraphCosts(nodes, cost, pbytes, live, cuttable, kind, tail)

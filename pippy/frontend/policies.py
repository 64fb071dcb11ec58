"""Split policies for ``pipeline(..., split_policy=...)``: their base, equal params, equal layers, by names.

    >>> import torch, pippy
    >>> from pippy.frontend.costsplit import autosplit
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    >>> policy = autosplit(2, cost="flops")
    >>> pipe = pippy.pipeline(net, 2, example_args=(torch.randn(4, 4),), split_policy=policy)
    >>> print(pipe.split_report())
    stage  cost (flops)  share  params  sends (per micro-batch)
    0      64 FLOP       47.1%  80 B    ->1 32 B
    1      72 FLOP       52.9%  80 B    -
    bottleneck: stage 1 at 72 FLOP (1.06x the even share); sent between stages: 32 B per micro-batch

A policy is called as ``policy(gm, example_inputs)`` on the traced graph and one micro-batch of
flat example inputs, and returns ``{compute node: stage}``. Every policy records the cost it
balanced in ``node.meta`` (so ``Pipe.split_report()`` can show it) and keeps ``stage_costs``,
``cost_kind`` and ``last_assignment`` (stage by node name) for inspection.

Measured costs (``cost="time"``) and time-limited solves differ from process to process. When
``torch.distributed`` is initialized, rank 0 computes the split and broadcasts it, so every rank
builds the same pipe (every rank must then call ``pipeline()``, as usual).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import fx

from pippy.frontend.costs import COMPUTE_OPS, COST_KINDS, COST_META, TAIL_META, GraphCosts, graph_costs
from pippy.frontend.cudadevice import collective_device
from pippy.frontend.partition import cut_positions

__all__ = [
    "SplitPolicyBase",
    "split_by_names",
    "split_equal_layers",
    "split_equal_params",
]

_Result = tuple[dict[str, int], dict[str, float], str, float]  # stage by name, cost by name, kind, tail


class SplitPolicyBase:
    """Base of the policies: ``policy(gm, example_inputs) -> {node: stage}`` plus what it balanced.

        >>> import torch, pippy
        >>> from pippy.frontend.costsplit import autosplit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
        >>> p = autosplit(2, cost="flops")
        >>> pipe = pippy.pipeline(net, 2, example_args=(torch.randn(4, 4),), split_policy=p)
        >>> p.cost_kind, p.stage_costs, p.last_assignment
        ('flops', [64.0, 72.0], {'linear': 0, 'relu': 1, 'linear_1': 1})
    """

    label = "policy"
    deterministic = True

    def __init__(self, num_stages: int) -> None:
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(
                f"{self.label}(num_stages={num_stages!r}): the number of stages must be an int >= 1, "
                "e.g. the number of pipeline ranks (times stages per rank for interleaved schedules)"
            )
        self.num_stages = num_stages
        self.stage_costs: list[float] | None = None
        self.cost_kind: str | None = None
        self.last_assignment: dict[str, int] = {}

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[fx.Node, int]:
        """Assign every compute node of ``gm`` to a stage in ``0..num_stages-1``."""
        result = _shared(lambda: self._compute(gm, list(example_inputs)), self.deterministic)
        by_name, costs, kind, tail = result
        nodes = [v for v in gm.graph.nodes if v.op in COMPUTE_OPS]
        missing = [v.name for v in nodes if v.name not in by_name]
        if missing:
            raise ValueError(
                f"{self.label}: no stage for nodes {missing[:5]}: this graph differs from the one the split was "
                "computed on; use the same model, config and example input shapes"
            )
        out = {v: by_name[v.name] for v in nodes}
        stage_costs = [0.0] * (max(out.values(), default=0) + 1)
        for v in nodes:
            c = costs.get(v.name, 0.0)
            v.meta[COST_META] = (kind, c)
            v.meta[TAIL_META] = tail
            stage_costs[out[v]] += c
        stage_costs[-1] += tail
        self.stage_costs, self.cost_kind, self.last_assignment = stage_costs, kind, by_name
        return out

    def _compute(self, gm: fx.GraphModule, inputs: list[Any]) -> _Result:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.label}({self.num_stages})"


def _shared(compute: Any, deterministic: bool) -> _Result:
    import torch.distributed as dist

    if deterministic or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()  # type: ignore[no-any-return]
    box: list[Any] = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=collective_device())  # NCCL: this process's CUDA device
    return box[0]  # type: ignore[no-any-return]


def _result(gc: GraphCosts, stages: Sequence[int]) -> _Result:
    return (
        {v.name: int(s) for v, s in zip(gc.nodes, stages)},
        {v.name: float(c) for v, c in zip(gc.nodes, gc.cost)},
        gc.kind,
        gc.tail,
    )


def _stages_from_starts(num: int, starts: Sequence[int]) -> list[int]:
    out = np.zeros(num, dtype=np.int64)
    for s, k in enumerate(starts):
        out[k:] = s
    return [int(x) for x in out]


def _check_kind(label: str, cost: str) -> None:
    if cost not in COST_KINDS:
        raise ValueError(f"{label}(cost={cost!r}): unknown cost kind; use one of {sorted(COST_KINDS)}")


def _too_many(label: str, n: int, gc: GraphCosts) -> None:
    most = len(cut_positions(gc)) - 1
    if n > most:
        raise ValueError(
            f"{label}({n}): the traced graph has {len(gc.nodes)} compute nodes and allows at most {most} stages "
            f"(cuts that would send a list of tensors are not allowed). Use num_stages <= {most}."
        )


class _EqualParams(SplitPolicyBase):
    label = "split_equal_params"

    def _compute(self, gm: fx.GraphModule, inputs: list[Any]) -> _Result:
        gc = graph_costs(gm, inputs, "params")
        n = self.num_stages
        _too_many(self.label, n, gc)
        pos = cut_positions(gc)
        prefix = np.concatenate([[0.0], np.cumsum(gc.param_bytes)])[pos]
        total = float(prefix[-1])
        if total <= 0:
            raise ValueError(f"{self.label}({n}): the model reads no parameters; use autosplit({n}, cost='flops')")
        starts, last = [0], 0
        for k in range(1, n):
            lo, hi = last + 1, len(pos) - 1 - (n - k)  # leave room for the stages after this one
            i = lo + int(np.argmin(np.abs(prefix[lo : hi + 1] - k * total / n)))
            starts.append(int(pos[i]))
            last = i
        return _result(gc, _stages_from_starts(len(gc.nodes), starts))


def split_equal_params(num_stages: int) -> SplitPolicyBase:
    """Cut so that each stage reads about ``1/num_stages`` of the parameter bytes (topological order).

    Buffers count with the parameters (a batch norm's running statistics): the cost is the state
    each stage holds, which is what the split report's cost column shows next to "params".

        >>> import torch, pippy
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
        >>> p = split_equal_params(2)
        >>> pipe = pippy.pipeline(net, 2, example_args=(torch.randn(4, 4),), split_policy=p)
        >>> p.stage_costs  # 160 + 288 + 144 bytes: the cut after 160 is nearest half the total
        [160.0, 432.0]
    """
    return _EqualParams(num_stages)


_IDX = re.compile(r"^(?:(.*)\.)?(\d+)$")  # "h.3" in container "h"; "3" in the model itself (a top-level Sequential)
_Layer = tuple[str, str]  # (container, child index)


def _norm_path(path: str) -> str:
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).replace("._modules", "").strip(".")


def _child(container: str, idx: str) -> str:
    return f"{container}.{idx}" if container else idx


def _layers_of(nodes: list[fx.Node], param_bytes: Sequence[float]) -> tuple[list[str], dict[fx.Node, _Layer]]:
    """Every outermost container of repeated children (``h``; ``encoder.block`` and ``decoder.block``; ``layer1`` ..
    ``layer4``), and each node's layer in them: a container inside a layer of another one is part of that layer."""
    children: dict[str, set[str]] = {}
    types: dict[str, set[str]] = {}  # container -> class names of its numbered children
    reads: dict[_Layer, float] = {}  # parameter bytes each child's nodes read
    per_node: list[list[_Layer]] = []
    for v, pb in zip(nodes, param_bytes):
        found: list[_Layer] = []
        for entry in (v.meta.get("nn_module_stack") or {}).values():
            m = _IDX.match(_norm_path(str(entry[0])))
            if m:
                key = (m.group(1) or "", m.group(2))
                found.append(key)
                children.setdefault(key[0], set()).add(key[1])
                types.setdefault(key[0], set()).add(str(entry[1]))
                reads[key] = reads.get(key, 0.0) + float(pb)
        per_node.append(found)
    stacks = [k for k, c in children.items() if len(c) >= 2 and len(types[k]) == 1  # same class: layers
              and all(reads[(k, i)] > 0 for i in c)]  # each holding parameters (not a list of activations)
    inner = {k for k in stacks for o in stacks for i in children[o]
             if k != o and (k == _child(o, i) or k.startswith(_child(o, i) + "."))}
    outer = [k for k in stacks if k not in inner]
    member = {v: next(key for key in found if key[0] in outer) for v, found in zip(nodes, per_node)
              if any(key[0] in outer for key in found)}
    return outer, member


class _EqualLayers(SplitPolicyBase):
    label = "split_equal_layers"

    def _compute(self, gm: fx.GraphModule, inputs: list[Any]) -> _Result:
        n = self.num_stages
        gc = graph_costs(gm, inputs, "flops")
        containers, member = _layers_of(gc.nodes, gc.param_bytes.tolist())
        if not containers:
            raise ValueError(
                f"{self.label}({n}): no repeated layers found (no module path like 'layers.0', 'layers.1' in the "
                "traced graph's nn_module_stack). Use autosplit(n) or split_equal_params(n) for this model."
            )
        order = list(dict.fromkeys(member[v] for v in gc.nodes if v in member))  # all lists, in execution order
        layers = len(order)
        if layers < n:
            where = ", ".join(repr(k) for k in containers)
            raise ValueError(
                f"{self.label}({n}): found only {layers} repeated layers under {where}, so at most {layers} "
                f"stages. Use num_stages <= {layers}, or autosplit({n}) which can cut inside layers."
            )
        counts = [layers // n] * n
        prefer = [*range(1, n - 1), 0, n - 1]  # extra layers go to middle stages, then the first
        for r in range(layers % n):
            counts[prefer[r % len(prefer)]] += 1
        layer_stage: dict[_Layer, int] = {}
        it = iter(order)
        for s, c in enumerate(counts):
            for _ in range(c):
                layer_stage[next(it)] = s
        index = {v: i for i, v in enumerate(gc.nodes)}
        stages = [0] * len(gc.nodes)
        for i, v in enumerate(gc.nodes):
            s = layer_stage[member[v]] if v in member else 0
            stages[i] = max([s, *(stages[index[u]] for u in v.all_input_nodes if u in index)])
        return _result(gc, stages)


def split_equal_layers(num_stages: int) -> SplitPolicyBase:
    """Give each stage the same number of repeated layers (``h.0``, ``layers.3``, ...).

    Every list of repeated layers counts, in the order forward runs them: an encoder's and a
    decoder's blocks (``encoder.block``, ``decoder.block``), ResNet's ``layer1`` .. ``layer4``, or
    the children of a model that is itself an ``nn.Sequential`` of blocks.
    Whatever runs before the first layer goes with the first stage, whatever runs after the last
    (final norm, head) with the last stage. Remainder layers go to the middle stages first.

        >>> import torch, pippy
        >>> blocks = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(4)))  # layers 0.0 .. 0.3
        >>> net = torch.nn.Sequential(blocks, torch.nn.Tanh())
        >>> p = split_equal_layers(2)
        >>> pipe = pippy.pipeline(net, 2, example_args=(torch.randn(4, 4),), split_policy=p)
        >>> p.last_assignment  # the final Tanh joins the last stage
        {'linear': 0, 'linear_1': 0, 'linear_2': 1, 'linear_3': 1, 'tanh': 1}
    """
    return _EqualLayers(num_stages)


class _ByNames(SplitPolicyBase):
    label = "split_by_names"

    def __init__(self, stages: Mapping[str, int]) -> None:
        values = list(stages.values())
        super().__init__(max(values, default=0) + 1)
        if any(not isinstance(s, int) or s < 0 for s in values):
            raise ValueError("split_by_names: stages must be ints >= 0")
        self.stages = dict(stages)

    def _compute(self, gm: fx.GraphModule, inputs: list[Any]) -> _Result:
        gc = graph_costs(gm, inputs, "flops")
        names = [n.name for n in gc.nodes]
        unknown = [k for k in self.stages if k not in set(names)]
        if unknown:
            near = {k: difflib.get_close_matches(k, names, n=1) for k in unknown[:3]}
            hint = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in near.items() if m)
            raise ValueError(
                f"split_by_names: {len(unknown)} of its {len(self.stages)} names are not operations of this graph "
                f"({unknown[:5]}{' ...' if len(unknown) > 5 else ''}){'; ' + hint if hint else ''}. Expected the "
                "node names of this model's trace: the split was computed for another graph (another model, "
                "config or input shapes). Compute it again for this one (e.g. autosplit(...).last_assignment)"
            )
        return self.stages, _result(gc, [0] * len(gc.nodes))[1], gc.kind, 0.0


def split_by_names(stages: Mapping[str, int]) -> SplitPolicyBase:
    """Replay a split given as ``{node name: stage}``, e.g. another policy's ``last_assignment``.

    Node names are stable for the same model, config and input shapes, so a split computed once
    (in a parent process, or saved to JSON) can be rebuilt anywhere.

        >>> import json, torch, pippy
        >>> from pippy.frontend.costsplit import autosplit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
        >>> x = torch.randn(4, 4)
        >>> p = autosplit(2, cost="flops")
        >>> pipe = pippy.pipeline(net, 2, (x,), split_policy=p)
        >>> saved = json.dumps(p.last_assignment)  # e.g. written by a parent process
        >>> again = split_by_names(json.loads(saved))
        >>> pipe = pippy.pipeline(net, 2, (x,), split_policy=again)
        >>> again.last_assignment == p.last_assignment
        True
    """
    return _ByNames(stages)

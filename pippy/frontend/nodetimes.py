"""Measured seconds of each compute node of a graph (forward + backward), for ``autosplit(cost="time")``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from pippy.frontend.dynamic import sym_hint

__all__ = ["COMPUTE_OPS", "loss_time", "measure_node_times"]

COMPUTE_OPS = ("call_function", "call_method", "call_module")
"""The graph node kinds that compute (costed, timed and cut between)."""


def loss_time(gm: fx.GraphModule, example_inputs: Sequence[Any], repeats: int) -> float:
    """Median seconds of a stand-in loss (log-softmax mean, forward + backward) on ``gm``'s floating outputs.

        >>> from pippy.frontend.trace import export_module
        >>> x = torch.randn(2, 4)
        >>> gm = export_module(torch.nn.Linear(4, 3), (x,)).module()
        >>> loss_time(gm, [x], repeats=1) > 0
        True
    """
    out = next(n for n in gm.graph.nodes if n.op == "output")
    vals = [v.meta.get("val") for v in out.all_input_nodes]
    shapes = [(tuple(sym_hint(d) for d in v.shape), v.dtype) for v in vals
              if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not shapes:
        return 0.0
    xs = [torch.zeros(s, dtype=d, requires_grad=True) for s, d in shapes if len(s) >= 1]  # values do not matter

    def run() -> None:
        loss = sum(torch.log_softmax(x, dim=-1).mean() for x in xs)
        if isinstance(loss, torch.Tensor):
            loss.backward()

    times = []
    for _ in range(max(1, repeats) + 1):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times[1:]))


class _TimingInterpreter(fx.Interpreter):  # type: ignore[misc]
    """One forward pass that times every compute node once (keeping every value, for the backward timing)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.fwd: dict[fx.Node, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in COMPUTE_OPS:
            return super().run_node(n)
        t0 = time.perf_counter()
        out = super().run_node(n)
        self.fwd[n] = time.perf_counter() - t0
        return out


def _timed_passes(gm: fx.GraphModule, example_inputs: Sequence[Any], repeats: int) -> _TimingInterpreter:
    """``repeats`` whole forward passes; the last one, holding each node's median time over the passes.

    Whole passes rather than one node repeated back to back: a stall of the machine (another
    process, a thread pool waking up) then lands in one pass's samples of a node, not in all of them.
    """
    samples: dict[fx.Node, list[float]] = {}
    interp = _TimingInterpreter(gm)
    for k in range(max(1, repeats)):
        if k:
            interp = _TimingInterpreter(gm)  # the pass before (and its values) is dropped
        inputs = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
                  for x in example_inputs]  # a graph that writes its inputs finds them as they were
        interp.run(*inputs)
        for n, t in interp.fwd.items():
            samples.setdefault(n, []).append(t)
    interp.fwd = {n: float(statistics.median(v)) for n, v in samples.items()}
    return interp


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, list | tuple):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def measure_node_times(gm: fx.GraphModule, example_inputs: Sequence[Any], repeats: int = 5) -> dict[fx.Node, float]:
    """Median forward + backward seconds of every compute node of ``gm`` on the real example inputs.

        >>> import torch
        >>> from pippy.frontend.trace import export_module
        >>> x = torch.randn(2, 4)
        >>> gm = export_module(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()), (x,)).module()
        >>> times = measure_node_times(gm, [x], repeats=1)
        >>> {v.name: t > 0 for v, t in times.items() if v.op == "call_function"}
        {'linear': True, 'tanh': True}
    """
    buffers = {k: b.detach().clone() for k, b in gm.named_buffers()}
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        with torch.enable_grad():
            interp = _timed_passes(gm, example_inputs, repeats)
            bwd = _backward_times(gm, interp, repeats)
    finally:
        torch.random.set_rng_state(rng)  # timing leaves the random streams as it found them (dropout draws)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        with torch.no_grad():
            for k, b in gm.named_buffers():
                if k in buffers:
                    b.copy_(buffers[k])
    return {n: t + bwd.get(n, 0.0) for n, t in interp.fwd.items()}


def _backward_times(gm: fx.GraphModule, interp: _TimingInterpreter, repeats: int) -> dict[fx.Node, float]:
    # A composite op (linear -> t, mm, view) makes several autograd nodes: a node owns every autograd
    # node reachable from its outputs that no earlier node owns.
    owner: dict[Any, fx.Node] = {}
    for node in interp.fwd:  # execution order
        todo = [t.grad_fn for t in _tensors(interp.env.get(node)) if t.grad_fn is not None]
        while todo:
            fn = todo.pop()
            if fn is None or fn in owner or type(fn).__name__ == "AccumulateGrad":
                continue
            owner[fn] = node
            todo.extend(nxt for nxt, _ in fn.next_functions)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    roots = [t for t in _tensors(fx.node.map_arg(out_node.args, lambda x: interp.env[x])) if t.grad_fn is not None]
    params = [p for p in gm.parameters() if p.requires_grad]
    leaves = params + [t for t in _tensors(list(interp.env.values())) if t.requires_grad and t.grad_fn is None]
    leaves = list({id(t): t for t in leaves}.values())
    if not roots or not leaves:
        return {}
    samples: dict[fx.Node, list[float]] = {n: [] for n in set(owner.values())}
    start: dict[Any, float] = {}
    acc: dict[fx.Node, float] = {}

    def pre(fn: Any) -> Any:
        def hook(_grads: Any) -> None:
            start[fn] = time.perf_counter()

        return hook

    def post(fn: Any, node: fx.Node) -> Any:
        def hook(_gi: Any, _go: Any) -> None:
            acc[node] = acc.get(node, 0.0) + time.perf_counter() - start.pop(fn, time.perf_counter())

        return hook

    handles = []
    for fn, node in owner.items():
        handles.append(fn.register_prehook(pre(fn)))
        handles.append(fn.register_hook(post(fn, node)))
    try:
        grads = [torch.ones_like(t) for t in roots]
        for _ in range(max(1, repeats)):
            acc.clear()
            torch.autograd.grad(roots, leaves, grads, retain_graph=True, allow_unused=True)
            for node in samples:
                samples[node].append(acc.get(node, 0.0))
    finally:
        for h in handles:
            h.remove()
    return {n: float(statistics.median(v)) for n, v in samples.items()}

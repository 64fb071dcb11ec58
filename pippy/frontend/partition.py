"""Exact contiguous partitioning of a costed node sequence: minimize the slowest stage, then the bytes cut.

    >>> import torch
    >>> from pippy.frontend.costs import graph_costs
    >>> from pippy.frontend.trace import export_module
    >>> net = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(4)))
    >>> x = torch.randn(2, 4)
    >>> gc = graph_costs(export_module(net, (x,)).module(), [x], "flops")
    >>> starts, costs = best_contiguous(gc, 2)
    >>> [gc.nodes[k].name for k in starts[1:]], costs  # stage 1 starts at the third Linear
    (['linear_2'], [128.0, 128.0])

Stages are runs of consecutive compute nodes in topological order, so every edge goes forward. A
dynamic program over the legal cut positions (``GraphCosts.cuttable``) finds the smallest possible
bottleneck ``B*`` exactly (``O(n * P^2)`` vectorized, ``P`` = cut positions). A second pass keeps
the bottleneck within ``B* * (1 + tolerance)`` and picks, among those partitions, the one whose
cuts carry the fewest live bytes (cleaner cuts: fewer, smaller tensors sent).

Memory model (``memory_limit``, bytes, per stage): the parameter bytes its nodes read (a tensor
read by two nodes counts twice, an upper bound) plus the live bytes at its start cut and at its
end cut (an upper bound on what one micro-batch sends and receives).
"""

from __future__ import annotations

import numpy as np

from pippy.frontend.costs import GraphCosts

__all__ = ["best_contiguous", "cut_positions", "min_memory_limit"]

_INF = float("inf")


class _Prefix:
    """Prefix sums at the legal cut positions."""

    def __init__(self, gc: GraphCosts) -> None:
        n = len(gc.nodes)
        inner = [k for k in range(1, n) if bool(gc.cuttable[k])]
        self.pos = np.array([0, *inner, n], dtype=np.int64)
        self.c = np.concatenate([[0.0], np.cumsum(gc.cost)])[self.pos]
        self.c[-1] += gc.tail  # borne by whichever stage ends at the end: the last
        self.p = np.concatenate([[0.0], np.cumsum(gc.param_bytes)])[self.pos]
        x = gc.live_bytes[self.pos].astype(np.float64)
        x[0] = x[-1] = 0.0  # the ends are not cuts
        self.x = x

    def mem(self, j: int) -> np.ndarray:
        """Memory of stages [i, j) for every i < j."""
        return self.p[j] - self.p[:j] + self.x[:j] + self.x[j]


def cut_positions(gc: GraphCosts) -> np.ndarray:
    """Node indices where a stage may begin (0 and len(nodes) included as the ends).

    ``len(cut_positions(gc)) - 1`` is the most stages the graph allows.

        >>> import torch
        >>> from pippy.frontend.costs import graph_costs
        >>> from pippy.frontend.trace import export_module
        >>> x = torch.randn(2, 4)
        >>> gm = export_module(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (x,)).module()
        >>> gc = graph_costs(gm, [x], "flops")
        >>> [gc.nodes[k].name for k in cut_positions(gc)[:-1] if gc.nodes[k].op == "call_function"]
        ['linear', 'relu']
    """
    return _Prefix(gc).pos


def _dp_minmax(pre: _Prefix, n: int, stage_value: str, memory_limit: float | None) -> float:
    """Smallest achievable max over stages of cost (``"cost"``) or memory (``"mem"``)."""
    size = len(pre.pos)
    g = np.full(size, _INF)
    g[0] = 0.0
    for k in range(1, n + 1):
        new = np.full(size, _INF)
        lo, hi = k, size - 1 - (n - k)
        for j in range(lo, hi + 1):
            mem = pre.mem(j)
            val = pre.c[j] - pre.c[:j] if stage_value == "cost" else mem
            cand = np.maximum(g[:j], val)
            if memory_limit is not None:
                cand = np.where(mem <= memory_limit, cand, _INF)
            new[j] = cand.min()
        g = new
    return float(g[-1])


def min_memory_limit(gc: GraphCosts, n: int) -> float:
    """The smallest per-stage memory limit (bytes, see the module docstring) that ``n`` stages allow.

        >>> import torch
        >>> from pippy.frontend.costs import graph_costs
        >>> from pippy.frontend.trace import export_module
        >>> net = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(4)))  # 80 parameter bytes each
        >>> x = torch.randn(2, 4)
        >>> gc = graph_costs(export_module(net, (x,)).module(), [x], "flops")
        >>> min_memory_limit(gc, 2)  # two Linears' parameters + the [2, 4] float32 sent at the cut
        192.0
    """
    return _dp_minmax(_Prefix(gc), n, "mem", None)


def best_contiguous(
    gc: GraphCosts, n: int, *, memory_limit: float | None = None, tolerance: float = 0.0
) -> tuple[list[int], list[float]]:
    """Optimal contiguous split into ``n`` stages: ``(starts, stage_costs)``; ``starts[s]`` is stage s's first node.

    Raises ``ValueError`` if the graph has fewer than ``n`` legal stages or no split fits
    ``memory_limit`` (the message names the smallest limit that would).

        >>> import torch
        >>> from pippy.frontend.costs import graph_costs
        >>> from pippy.frontend.trace import export_module
        >>> sizes = [(4, 8), (8, 8), (8, 8), (8, 4)]  # FLOPs 128, 256, 256, 128 for a batch of 2
        >>> net = torch.nn.Sequential(*(torch.nn.Linear(i, o) for i, o in sizes))
        >>> x = torch.randn(2, 4)
        >>> gc = graph_costs(export_module(net, (x,)).module(), [x], "flops")
        >>> best_contiguous(gc, 2)[1]  # the stage costs; their max is the optimal bottleneck
        [384.0, 384.0]
        >>> best_contiguous(gc, 2, memory_limit=100)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: memory_limit=100 bytes is infeasible for 2 stages: ...
    """
    pre = _Prefix(gc)
    size = len(pre.pos)
    if size - 1 < n:
        raise ValueError(
            f"cannot make {n} stages: the traced graph has {len(gc.nodes)} compute nodes and only {size - 1} "
            f"legal stage boundaries allow at most {size - 1} stages. Use num_stages <= {size - 1}."
        )
    best = _dp_minmax(pre, n, "cost", memory_limit)
    if best == _INF:
        need = min_memory_limit(gc, n)
        raise ValueError(
            f"memory_limit={memory_limit:,.0f} bytes is infeasible for {n} stages: under the memory model "
            f"(parameter bytes + live activation bytes at the stage's cuts) the smallest feasible limit is "
            f"{need:,.0f} bytes ({need / 2**20:.2f} MiB). Raise memory_limit to at least that, or use more stages."
        )
    cap = best * (1.0 + tolerance) + 1e-12 * max(abs(float(pre.c[-1])), 1.0)
    # Second pass: minimum total live bytes at the cuts among splits with bottleneck <= cap.
    h = np.full(size, _INF)
    h[0] = 0.0
    back = np.zeros((n + 1, size), dtype=np.int64)
    for k in range(1, n + 1):
        new = np.full(size, _INF)
        lo, hi = k, size - 1 - (n - k)
        for j in range(lo, hi + 1):
            ok = pre.c[j] - pre.c[:j] <= cap
            if memory_limit is not None:
                ok &= pre.mem(j) <= memory_limit
            cand = np.where(ok, h[:j] + pre.x[:j], _INF)
            i = int(np.argmin(cand))
            new[j] = cand[i]
            back[k, j] = i
        h = new
    assert h[-1] < _INF, "second pass must find the first pass's optimum"
    idx = [size - 1]
    for k in range(n, 0, -1):
        idx.append(int(back[k, idx[-1]]))
    idx.reverse()  # idx[0] == 0, idx[n] == size - 1
    starts = [int(pre.pos[i]) for i in idx[:-1]]
    costs = [float(pre.c[idx[s + 1]] - pre.c[idx[s]]) for s in range(n)]
    return starts, costs

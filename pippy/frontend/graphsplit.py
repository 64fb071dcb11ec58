"""A mixed-integer program (scipy HiGHS) that assigns graph nodes to stages: least bytes cut, balanced, no backward edge.

``pippy.graphsplit`` builds the program from ``autosplit``'s optimal contiguous split (the example
under :func:`solve_graphsplit` shows the call).

Coarsening: compute nodes are grouped into super-nodes, each a run of consecutive nodes (in
topological order) of the same leaf module with no cut inside that would send an unsendable value.
Runs are broken at ``forced`` positions, so a contiguous split found by ``autosplit`` is always a
feasible point. If there are more than ``max_groups`` runs, the module path is shortened until
there are not.

Program, for ``G`` super-nodes and ``n`` stages, with binaries ``y[g, s] = [stage(g) >= s]`` for
``s = 1..n-1`` (so ``stage(g) = sum_s y[g, s]``)::

    y[g, s+1] <= y[g, s]                       stage indicator is monotone
    y[p, s]   <= y[c, s]   for each edge p->c  stage(p) <= stage(c): edges only go forward
    sum_g w_g (y[g, t] - y[g, t+1]) <= cap      every stage's cost is within the balance bound
    sum_g     (y[g, t] - y[g, t+1]) >= 1        no stage is empty
    z[v, s] >= y[c, s] - y[p, s]               value v (made in p, read in c) is live across cut s
    minimize  sum_v bytes(v) * sum_s z[v, s]  (+ a tiny tie-break on the largest stage cost)

The objective counts a value once for every stage boundary it spans (a skip value that jumps
two boundaries counts twice): the bytes a relay would carry, an upper bound on direct sends.
User inputs live in stage 0 and the graph output in the last stage, which also bears
``GraphCosts.tail`` (the loss).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from torch import fx

from pippy.frontend.costs import GraphCosts, value_nbytes

__all__ = ["MilpResult", "solve_graphsplit"]


class MilpResult:
    """The solver's answer: ``stages[i]`` for node ``gc.nodes[i]`` (None if no solution) and its status.

        >>> MilpResult(None, 1, "time limit", 12).optimal
        False
    """

    def __init__(self, stages: list[int] | None, status: int, message: str, groups: int) -> None:
        self.stages = stages
        self.status = status
        self.message = message
        self.groups = groups

    @property
    def optimal(self) -> bool:
        """True when HiGHS proved the solution optimal."""
        return self.status == 0 and self.stages is not None


def _module_key(node: fx.Node, depth: int | None) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    return path if depth is None else ".".join(path.split(".")[:depth])


def _groups(gc: GraphCosts, forced: set[int], max_groups: int) -> list[int]:
    """Start index of every super-node (ascending, first is 0)."""
    n = len(gc.nodes)
    depths: list[int | None] = [None]
    deepest = max((len(_module_key(v, None).split(".")) for v in gc.nodes), default=0)
    depths += list(range(deepest - 1, -1, -1))
    starts = [0]
    for depth in depths:
        keys = [_module_key(v, depth) for v in gc.nodes]
        starts = [0] + [k for k in range(1, n) if gc.cuttable[k] and (keys[k] != keys[k - 1] or k in forced)]
        if len(starts) <= max_groups:
            break
    return starts


def solve_graphsplit(
    gc: GraphCosts, n: int, *, cap: float, forced: set[int], time_limit: float, max_groups: int = 400
) -> MilpResult:
    """Solve the stage-assignment MILP (see the module docstring) within ``time_limit`` seconds.

        >>> import torch
        >>> from pippy.frontend.costs import graph_costs
        >>> from pippy.frontend.partition import best_contiguous
        >>> from pippy.frontend.trace import export_module
        >>> net = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(4)))
        >>> x = torch.randn(2, 4)
        >>> gc = graph_costs(export_module(net, (x,)).module(), [x], "flops")
        >>> starts, costs = best_contiguous(gc, 2)
        >>> res = solve_graphsplit(gc, 2, cap=1.02 * max(costs), forced=set(starts), time_limit=5.0)
        >>> res.optimal, [s for v, s in zip(gc.nodes, res.stages) if v.op == "call_function"]
        (True, [0, 0, 1, 1])
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    num = len(gc.nodes)
    if n == 1:
        return MilpResult([0] * num, 0, "one stage", 1)
    starts = _groups(gc, forced, max_groups)
    m = len(starts)
    group_of = np.zeros(num, dtype=np.int64)
    for g, s in enumerate(starts):
        group_of[s:] = g
    index = {v: i for i, v in enumerate(gc.nodes)}
    raw = np.bincount(group_of, weights=gc.cost, minlength=m)
    total = float(raw.sum() + gc.tail) or 1.0
    w = raw / total
    cap_n = cap / total
    S = n - 1  # cut indicators per group

    def y(g: int, s: int) -> int:  # s in 1..n-1
        return g * S + (s - 1)

    # Values crossing groups: (producer group or -1 for user input, consumer groups incl. m for output) -> bytes.
    flows: dict[tuple[int, frozenset[int]], float] = defaultdict(float)
    edges: set[tuple[int, int]] = set()
    for v in gc.nodes[0].graph.nodes:
        if v.op not in ("placeholder",) and v not in index:
            continue
        p = -1 if v.op == "placeholder" else int(group_of[index[v]])
        cons = {m if u.op == "output" else int(group_of[index[u]]) for u in v.users if u.op == "output" or u in index}
        cons.discard(p)
        for c in cons:
            if p >= 0 and c < m:
                edges.add((p, c))
        b = float(value_nbytes(v))
        if cons and b > 0:
            flows[(p, frozenset(cons))] += b
    flow_list = list(flows.items())
    scale = max((b for _, b in flow_list), default=1.0)
    nz = len(flow_list) * S
    nvar = m * S + nz + 1  # y, z, T (largest normalized stage cost)
    t_var = nvar - 1
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lb: list[float] = []
    ub: list[float] = []

    def row(entries: list[tuple[int, float]], lo: float, hi: float) -> None:
        r = len(lb)
        for c, val in entries:
            rows.append(r)
            cols.append(c)
            vals.append(val)
        lb.append(lo)
        ub.append(hi)

    for g in range(m):
        for s in range(1, S):
            row([(y(g, s + 1), 1.0), (y(g, s), -1.0)], -np.inf, 0.0)
    for p, c in edges:
        for s in range(1, S + 1):
            row([(y(p, s), 1.0), (y(c, s), -1.0)], -np.inf, 0.0)
    for t in range(n):  # stage t membership = y[g, t] - y[g, t+1], with y[., 0] = 1 and y[., n] = 0
        load: list[tuple[int, float]] = []
        count: list[tuple[int, float]] = []
        const_w, const_c = (gc.tail / total if t == n - 1 else 0.0), 0.0
        for g in range(m):
            if t == 0:
                const_w += w[g]
                const_c += 1.0
            else:
                load.append((y(g, t), w[g]))
                count.append((y(g, t), 1.0))
            if t + 1 <= S:
                load.append((y(g, t + 1), -w[g]))
                count.append((y(g, t + 1), -1.0))
        row(load, -np.inf, cap_n - const_w)
        row([*load, (t_var, -1.0)], -np.inf, -const_w)
        row(count, 1.0 - const_c, np.inf)
    cost = np.zeros(nvar)
    for f, ((p, readers), b) in enumerate(flow_list):
        for s in range(1, S + 1):
            zi = m * S + f * S + (s - 1)
            cost[zi] = b / scale
            for c in readers:
                entries = [(zi, 1.0)]
                lo = 0.0
                if c < m:
                    entries.append((y(c, s), -1.0))
                else:
                    lo += 1.0  # the output is in the last stage: y[out, s] = 1
                if p >= 0:
                    entries.append((y(p, s), 1.0))
                row(entries, lo, np.inf)
    cost[t_var] = 1e-3 * min((b / scale for _, b in flow_list), default=1.0)
    integrality = np.zeros(nvar)
    integrality[: m * S] = 1
    lo_b = np.zeros(nvar)
    hi_b = np.ones(nvar)
    hi_b[t_var] = np.inf
    a = coo_matrix((vals, (rows, cols)), shape=(len(lb), nvar)).tocsr()
    res: Any = milp(
        cost,
        constraints=LinearConstraint(a, np.array(lb), np.array(ub)),
        integrality=integrality,
        bounds=Bounds(lo_b, hi_b),
        options={"time_limit": float(time_limit), "disp": False},
    )
    if res.x is None:
        return MilpResult(None, int(res.status), str(res.message), m)
    ys = np.rint(res.x[: m * S]).reshape(m, S)
    group_stage = ys.sum(axis=1).astype(np.int64)
    stages = [int(group_stage[group_of[i]]) for i in range(num)]
    return MilpResult(stages, int(res.status), str(res.message), m)

"""Cost-balanced split policies: ``autosplit`` (exact contiguous bottleneck) and ``graphsplit`` (a MILP).

    >>> import torch, pippy
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    >>> policy = autosplit(2, cost="flops")
    >>> pipe = pippy.pipeline(net, 2, example_args=(torch.randn(4, 4),), split_policy=policy)
    >>> policy.stage_costs
    [64.0, 72.0]

Both measure or estimate each node's cost on the traced graph (``pippy.frontend.costs``); the
simpler policies and their base class are in ``pippy.frontend.policies``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from torch import fx

from pippy.frontend.costs import GraphCosts, graph_costs
from pippy.frontend.graphsplit import solve_graphsplit
from pippy.frontend.partition import best_contiguous
from pippy.frontend.policies import (
    SplitPolicyBase,
    _check_kind,
    _Result,
    _result,
    _stages_from_starts,
    _too_many,
)

__all__ = ["autosplit", "graphsplit"]


def _check_costing(label: str, cost: str, repeats: int) -> None:
    _check_kind(label, cost)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"{label}(repeats={repeats!r}): repeats must be an int >= 1 (timing runs per node)")


class _AutoSplit(SplitPolicyBase):
    label = "autosplit"

    def __init__(self, n: int, cost: str, memory_limit: float | None, tolerance: float | None, repeats: int) -> None:
        super().__init__(n)
        _check_costing(self.label, cost, repeats)
        if memory_limit is not None and (isinstance(memory_limit, bool) or not memory_limit > 0):
            raise ValueError(f"autosplit(memory_limit={memory_limit!r}): give a positive number of bytes, or None")
        if tolerance is not None and not tolerance >= 0:
            raise ValueError(f"autosplit(tolerance={tolerance!r}): give a number >= 0, e.g. 0.01 for 1%")
        self.cost, self.memory_limit, self.repeats = cost, memory_limit, repeats
        self.tolerance = tolerance if tolerance is not None else (0.02 if cost == "time" else 0.0)
        self.deterministic = cost != "time"

    def costs(self, gm: fx.GraphModule, inputs: list[Any]) -> GraphCosts:
        gc = graph_costs(gm, inputs, self.cost, repeats=self.repeats)
        _too_many(self.label, self.num_stages, gc)
        return gc

    def _compute(self, gm: fx.GraphModule, inputs: list[Any]) -> _Result:
        gc = self.costs(gm, inputs)
        starts, _ = best_contiguous(gc, self.num_stages, memory_limit=self.memory_limit, tolerance=self.tolerance)
        return _result(gc, _stages_from_starts(len(gc.nodes), starts))


def autosplit(
    num_stages: int,
    cost: str = "time",
    memory_limit: float | None = None,
    *,
    tolerance: float | None = None,
    repeats: int = 5,
) -> SplitPolicyBase:
    """Contiguous stages (topological order) that minimize the slowest stage, exactly.

    ``cost``: ``"time"`` (each node's forward + backward measured on the example micro-batch, median
    of ``repeats``), ``"flops"`` (estimated from shapes) or ``"params"`` (parameter bytes read).
    A dynamic program finds the optimal bottleneck; among splits within ``1 + tolerance`` of it
    (default 2% for time, as timings are noisy; exact otherwise) it takes the one cutting the fewest live bytes. With
    ``"time"`` the last stage is also charged a log-softmax loss over the outputs (it computes the loss).
    ``memory_limit`` (bytes per stage) bounds parameter bytes plus the live activation bytes at the
    stage's two cuts (see ``pippy.frontend.partition``); if nothing fits, the error names the
    smallest limit that does.

        >>> import torch, pippy
        >>> sizes = [(4, 8), (8, 8), (8, 8), (8, 4)]
        >>> net = torch.nn.Sequential(*(torch.nn.Linear(i, o) for i, o in sizes))
        >>> p = autosplit(2, cost="flops")
        >>> pipe = pippy.pipeline(net, 2, example_args=(torch.randn(4, 4),), split_policy=p)
        >>> p.stage_costs, p.last_assignment
        ([384.0, 384.0], {'linear': 0, 'linear_1': 0, 'linear_2': 1, 'linear_3': 1})
    """
    return _AutoSplit(num_stages, cost, memory_limit, tolerance, repeats)


class _GraphSplit(_AutoSplit):
    label = "graphsplit"
    deterministic = False

    def __init__(self, n: int, balance: float, time_limit: float, cost: str, repeats: int) -> None:
        super().__init__(n, cost, None, 0.0, repeats)
        if isinstance(balance, bool) or not isinstance(balance, int | float) or not balance >= 0:
            raise ValueError(f"graphsplit(balance={balance!r}): give a number >= 0, e.g. 0.02 (stage cost <= 1.02x)")
        if isinstance(time_limit, bool) or not isinstance(time_limit, int | float) or not time_limit > 0:
            raise ValueError(f"graphsplit(time_limit={time_limit!r}): give the solver's limit in seconds, > 0")
        self.balance, self.time_limit = float(balance), float(time_limit)
        self.deterministic = False
        self.solver_status: str = ""

    def _compute(self, gm: fx.GraphModule, inputs: list[Any]) -> _Result:
        gc = self.costs(gm, inputs)
        n = self.num_stages
        starts, costs = best_contiguous(gc, n, tolerance=0.0)
        fallback = _result(gc, _stages_from_starts(len(gc.nodes), starts))
        cap = max(costs) * (1.0 + self.balance) + 1e-9 * max(float(gc.cost.sum() + gc.tail), 1.0)
        try:
            res = solve_graphsplit(gc, n, cap=cap, forced=set(starts), time_limit=self.time_limit)
        except Exception as exc:  # a solver error must not break pipeline(); autosplit's answer is valid
            warnings.warn(f"graphsplit: the MILP solver failed ({exc!r}); using autosplit's split", stacklevel=3)
            self.solver_status = f"failed: {exc!r}"
            return fallback
        self.solver_status = res.message
        if res.stages is None or not _valid(gc, res.stages, n, cap):
            warnings.warn(
                f"graphsplit: the MILP gave no usable solution within {self.time_limit:g}s ({res.message}); "
                "using autosplit's split. Raise time_limit or balance to let the solver finish.",
                stacklevel=3,
            )
            return fallback
        if not res.optimal:
            warnings.warn(f"graphsplit: solver stopped early ({res.message}); using its best split", stacklevel=3)
        return _result(gc, res.stages)


def _valid(gc: GraphCosts, stages: list[int], n: int, cap: float) -> bool:
    index = {v: i for i, v in enumerate(gc.nodes)}
    if sorted(set(stages)) != list(range(n)):
        return False
    for i, v in enumerate(gc.nodes):
        if any(stages[index[u]] > stages[i] for u in v.all_input_nodes if u in index):
            return False
    loads = np.bincount(np.array(stages), weights=gc.cost, minlength=n)
    loads[-1] += gc.tail
    return bool(loads.max() <= cap * (1 + 1e-6))


def graphsplit(
    num_stages: int, balance: float = 0.02, time_limit: float = 5.0, *, cost: str = "time", repeats: int = 5
) -> SplitPolicyBase:
    """Stages from a MILP over the traced graph: fewest bytes crossing stages, balanced, edges forward.

    Each stage's cost stays within ``(1 + balance)`` times autosplit's optimal bottleneck; stages
    need not be contiguous in node order (a node may move to where its value is used). Solved with
    ``scipy.optimize.milp`` (HiGHS) on super-nodes (runs of one leaf module) within ``time_limit``
    seconds; if it finds nothing usable it warns and returns autosplit's split. The model is in
    ``pippy.frontend.graphsplit``.

        >>> import torch, pippy
        >>> net = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(4)))
        >>> p = graphsplit(2, balance=0.05, cost="flops")
        >>> pipe = pippy.pipeline(net, 2, example_args=(torch.randn(4, 4),), split_policy=p)
        >>> p.stage_costs, pipe.num_stages
        ([128.0, 128.0], 2)
    """
    return _GraphSplit(num_stages, balance, time_limit, cost, repeats)

"""PiPPy's split-policy names (``split_into_equal_size``, ``split_on_size_threshold``, ``split_by_graph``).

    >>> import torch, pippy
    >>> net = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(4)))
    >>> pipe = pippy.pipeline(net, 2, (torch.randn(4, 8),), split_policy=split_into_equal_size(2))
    >>> pipe.num_stages
    2

Each returns a policy for ``pipeline(..., split_policy=...)``. A PiPPy-style policy of your own,
``fn(gm) -> gm`` that inserts ``aten_pipe_split_alias`` calls into the traced graph, is accepted too:
``pipeline`` then cuts at the calls it finds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx

from pippy.frontend.costs import graph_costs
from pippy.frontend.costsplit import graphsplit
from pippy.frontend.params import tensor_at
from pippy.frontend.partition import cut_positions
from pippy.frontend.policies import (
    SplitPolicyBase,
    _Result,
    _result,
    _stages_from_starts,
    split_equal_params,
)
from pippy.frontend.trace import pipe_split_op

__all__ = ["aten_pipe_split_alias", "split_by_graph", "split_into_equal_size", "split_on_size_threshold"]

aten_pipe_split_alias = pipe_split_op()
"""The traced ``pipe_split()`` op: insert ``gm.graph.call_function(aten_pipe_split_alias)`` to cut there."""


def split_into_equal_size(nstages: int = 1) -> SplitPolicyBase:
    """``nstages`` stages holding about equal parameter bytes (pippy's ``split_equal_params``).

        >>> split_into_equal_size(4)
        split_equal_params(4)
    """
    return split_equal_params(nstages)


def split_by_graph(nstages: int) -> SplitPolicyBase:
    """``nstages`` stages from a graph partition balancing FLOPs with the fewest bytes between stages.

    This is pippy's ``graphsplit(nstages, cost="flops")`` (deterministic, so every rank agrees).

        >>> split_by_graph(2)
        graphsplit(2)
    """
    return graphsplit(nstages, cost="flops")


class _SizeThreshold(SplitPolicyBase):
    label = "split_on_size_threshold"

    def __init__(self, threshold: int) -> None:
        super().__init__(1)
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold <= 0:
            raise ValueError(
                f"split_on_size_threshold({threshold!r}): the threshold is a positive number of parameter elements "
                "per stage (numel, as PiPPy counted), e.g. 10**6"
            )
        self.threshold = float(threshold)

    def _compute(self, gm: fx.GraphModule, inputs: list[Any]) -> _Result:
        gc = graph_costs(gm, inputs, "params")
        pos = [int(p) for p in cut_positions(gc)]
        prefix = np.concatenate([[0.0], np.cumsum([_param_numel(gm, n) for n in gc.nodes])])
        starts, start = [0], 0
        for k in range(1, len(pos) - 1):
            # cut before pos[k] when taking the nodes up to the next allowed cut would pass the threshold
            if prefix[pos[k + 1]] - prefix[start] > self.threshold and prefix[pos[k]] > prefix[start]:
                starts.append(pos[k])
                start = pos[k]
        self.num_stages = len(starts)
        return _result(gc, _stages_from_starts(len(gc.nodes), starts))

    def __repr__(self) -> str:
        return f"{self.label}({self.threshold:g})"


def _param_numel(gm: fx.GraphModule, node: fx.Node) -> int:
    """Elements of the parameters and buffers ``node`` reads."""
    total = 0
    for src in node.all_input_nodes:
        if src.op == "get_attr":
            obj = tensor_at(gm, str(src.target))
            total += obj.numel() if isinstance(obj, torch.Tensor) else 0
    return total


def split_on_size_threshold(threshold: int) -> SplitPolicyBase:
    """Greedy stages: a new stage starts where the current one would pass ``threshold`` parameter elements.

    Elements (``numel``), as PiPPy counted them. The number of stages follows from the model; a
    single block larger than the threshold gets a stage of its own.

        >>> import torch, pippy
        >>> net = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(4)))   # 72 elements each
        >>> pippy.pipeline(net, 1, (torch.randn(2, 8),), split_policy=split_on_size_threshold(150)).num_stages
        2
    """
    return _SizeThreshold(threshold)

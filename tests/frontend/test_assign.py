"""Stage assignment: split points next to a split policy and policies that leave a stage empty fail clearly."""

from __future__ import annotations

import pytest
import torch
from models import MarkedMLP
from torch import nn

from pippy import SplitPoint, pipeline
from pippy.frontend.policies import split_by_names, split_equal_params
from pippy.frontend.trace import PipeTraceError


def test_split_spec_with_policy_is_refused() -> None:
    net = nn.Sequential(*(nn.Linear(8, 8) for _ in range(6))).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(PipeTraceError, match=r"SplitPoint.END of '0'.*split_equal_params\(2\).*drop split_policy"):
        pipeline(net, 2, (x,), split_spec={"0": SplitPoint.END}, split_policy=split_equal_params(2))


def test_pipe_split_markers_with_policy_are_refused() -> None:
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(PipeTraceError, match=r"pipe_split\(\).*split_equal_params\(2\)"):
        pipeline(MarkedMLP(n=4).double(), 2, (x,), split_policy=split_equal_params(2))


def test_policy_leaving_a_stage_empty_is_refused() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    policy = split_by_names({"linear": 0, "tanh": 0, "linear_1": 2})
    with pytest.raises(PipeTraceError, match=r"stage 1 of 3 would be empty: split_policy=split_by_names"):
        pipeline(net, 2, (x,), split_policy=policy)

"""The process groups pippy reads off stages and their wrappers are the ones the user gave."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed._composable.replicate import replicate

import pippy
from pippy import SplitPoint, pipeline
from pippy.runtime.dpgroup import dp_group_of


def test_replicate_s_group_is_read_after_its_first_forward(world_of_one: None) -> None:
    """replicate() drops the kwargs it was given once its first forward builds the DDP inside: pippy read WORLD
    then (a dp 2 x pp 2 sum loss trained 2x the gradient from the second step on)."""
    group = dist.new_group([0])
    net = torch.nn.Linear(4, 2)
    replicate(net, process_group=group)
    assert dp_group_of(net) is group
    net(torch.randn(3, 4)).sum().backward()
    assert dp_group_of(net) is group
    assert dp_group_of(torch.nn.Linear(4, 2)) is None


def test_a_rank_s_stages_over_different_groups_are_refused(world_of_one: None) -> None:
    """The schedule sent over the first stage's group only: the other was ignored, or the error blamed the split."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    pipe = pipeline(net, 2, (torch.randn(4, 4),), split_spec={"0": SplitPoint.END})
    other = dist.new_group([0])
    stages = [pipe.build_stage(0, "cpu"), pipe.build_stage(1, "cpu", group=other)]
    with pytest.raises(ValueError, match=r"stages were built over different process groups \(stage 0: default "
                                         r"\(WORLD\), stage 1: .*Expected the same group= in every build_stage"):
        pippy.ScheduleInterleaved1F1B(stages, 2)
    same = [pipe.build_stage(0, "cpu", group=dist.group.WORLD), pipe.build_stage(1, "cpu")]
    assert pippy.ScheduleInterleaved1F1B(same, 2).stages == same  # None and WORLD are one group

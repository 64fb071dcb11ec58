"""A schedule given a pipe of another stage count than it runs: a ValueError (and StageError) saying how to fix it."""

from __future__ import annotations

import pytest
import torch

from pippy import PipelineStage, ScheduleDualPipeV, ScheduleZBV, ScheduleZBVZeroBubble, StageError
from pippy.runtime.stage import StageCountError


@pytest.mark.parametrize("cls", [ScheduleZBV, ScheduleZBVZeroBubble, ScheduleDualPipeV])
@pytest.mark.parametrize("n", [1, 3])
def test_v_schedules_given_other_than_two_hand_cut_stages_per_rank(world_of_one: None, cls: type, n: int) -> None:
    stages = [PipelineStage(torch.nn.Linear(8, 8), i, n, "cpu") for i in range(n)]
    with pytest.raises(ValueError) as info:  # as PyTorch's pipelining raises
        cls(stages, 8)
    assert isinstance(info.value, StageError) and isinstance(info.value, StageCountError)  # as pippy raised before
    msg = str(info.value)
    assert msg.startswith(f"{cls.__name__}: on 1 rank(s) this schedule runs 2 stages, 2 per rank (placement [0, 0]")
    assert f"but the pipe has {n} stages, {n} of them passed on this rank. Expected 2 stages: build 2 hand-cut " in msg
    assert f"PipelineStage(module, i, 2, device) for i in 0..1; these were built with num_stages={n}" in msg
    assert f"{cls.__name__}.placement(1, 2)" in msg
    assert "pipe_split" not in msg and "split point" not in msg  # these stages were cut by hand, not traced

"""PyTorch pipelining's custom-schedule pattern: a subclass assigns ``self.pipeline_order`` in ``__init__`` and runs it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from models import check_mse_step, mlp_pipe
from torch.distributed.pipelining.schedules import _Action, _ComputationType

from pippy import PipelineScheduleMulti, ScheduleInterleaved1F1B
from pippy.PipelineSchedule import _PipelineScheduleRuntime
from pippy.runtime.local import LocalPipeline

F, B = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD


class ScheduleVShaped(PipelineScheduleMulti):
    """As in PyTorch's schedule_registry.py: 4 stages in a V on 2 ranks, one micro-batch, None for idle slots."""

    @classmethod
    def placement(cls, num_ranks: int, stages_per_rank: int = 2) -> tuple[int, ...]:
        return (0, 1, 1, 0)

    def __init__(self, stages: Any, n_microbatches: int, loss_fn: Any = None, **kwargs: Any) -> None:
        super().__init__(stages, n_microbatches, loss_fn, **kwargs)
        self.pipeline_order = {
            0: [_Action(0, F, 0), None, None, _Action(3, F, 0), _Action(3, B, 0), None, None, _Action(0, B, 0)],
            1: [None, _Action(1, F, 0), _Action(2, F, 0), None, None, _Action(2, B, 0), _Action(1, B, 0), None],
        }
        self._validate_and_set_stage_mapping(self.pipeline_order)


class ScheduleWithW(PipelineScheduleMulti):
    """Split backward written out by hand (I and W), two micro-batches, stages looped over 2 ranks."""

    def __init__(self, stages: Any, n_microbatches: int, loss_fn: Any = None, **kwargs: Any) -> None:
        super().__init__(stages, n_microbatches, loss_fn, **kwargs)
        order = {
            0: ["0F0", "0F1", "2F0", "2F1", None, "2I0", "2W0", "0I0", "2I1", "0W0", "0I1", "2W1", "0W1"],
            1: [None, "1F0", "1F1", "3F0", "3I0", "3F1", "1I0", "3I1", "3W0", "1I1", "1W0", "3W1", "1W1"],
        }
        self.pipeline_order = {r: [None if a is None else _Action.from_str(a) for a in row] for r, row in order.items()}
        self._validate_and_set_stage_mapping(self.pipeline_order)


@pytest.mark.parametrize("cls,n_mb", [(ScheduleVShaped, 1), (ScheduleWithW, 2)])
def test_a_subclass_assigning_pipeline_order_trains_as_the_model(cls: type, n_mb: int) -> None:
    model, pipe, x, y = mlp_pipe(4, n_mb)
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=n_mb, loss_fn=torch.nn.functional.mse_loss)
    check_mse_step(lp, model, x, y, atol=1e-12)
    rows = {r: [str(a) for a in row] for r, row in lp.schedules[0].pipeline_order.items()}
    assert rows[0][:2] == (["0F0", "3F0"] if cls is ScheduleVShaped else ["0F0", "0F1"])
    kinds = {a.kind.value for a in lp.schedules[1].pipeline_order[1]}
    assert kinds == ({"F", "B"} if cls is ScheduleVShaped else {"F", "I", "W"})


def test_an_assigned_order_is_checked_and_the_comms_form_loads_its_compute_order() -> None:
    model, pipe, x, y = mlp_pipe(2, 2)
    lp = LocalPipeline(pipe, _PipelineScheduleRuntime, num_ranks=2, n_microbatches=2,
                       loss_fn=torch.nn.functional.mse_loss)
    with pytest.raises(ValueError, match="1B0 missing: 1F0 has no complete backward"):
        lp.schedules[1].pipeline_order = {0: ["0F0", "0F1", "0B0", "0B1"], 1: ["1F0", "1F1"]}
    for sched in lp.schedules:
        sched.pipeline_order_with_comms = {
            0: ["0F0", "0F1", "0SEND_F0", "0SEND_F1", "0RECV_B0", "0RECV_B1", "0B0", "0B1"],
            1: ["1RECV_F0", "1RECV_F1", "1F0", "1F1", "1B0", "1B1", "1SEND_B0", "1SEND_B1"],
        }
    check_mse_step(lp, model, x, y, atol=1e-12)
    assert [str(a) for a in lp.schedules[1].pipeline_order[1]] == ["1F0", "1F1", "1B0", "1B1"]
    assert any("SEND" in str(a) for a in lp.schedules[0].pipeline_order_with_comms[0])


class ScheduleFilled(PipelineScheduleMulti):
    """The peer's own pattern: assign {}, fill it rank by rank, then validate (its _load_csv does the same)."""

    def __init__(self, stages: Any, n_microbatches: int, loss_fn: Any = None, **kwargs: Any) -> None:
        super().__init__(stages, n_microbatches, loss_fn, **kwargs)
        self.pipeline_order = {}
        for rank, row in {0: ["0F0", "0F1", "2F0", "2F1", "2B0", "2B1", "0B0", "0B1"],
                          1: ["1F0", "1F1", "3F0", "3F1", "3B0", "3B1", "1B0", "1B1"]}.items():
            self.pipeline_order[rank] = [_Action.from_str(a) for a in row]
        self._validate_and_set_stage_mapping(self.pipeline_order)


def test_an_order_filled_rank_by_rank_runs() -> None:
    model, pipe, x, y = mlp_pipe(4, 2)
    lp = LocalPipeline(pipe, ScheduleFilled, num_ranks=2, n_microbatches=2, loss_fn=torch.nn.functional.mse_loss)
    check_mse_step(lp, model, x, y, atol=1e-12)
    assert [str(a) for a in lp.schedules[0].pipeline_order[0]][:4] == ["0F0", "0F1", "2F0", "2F1"]


def test_a_row_written_on_the_order_read_runs_from_the_next_step() -> None:
    """``sched.pipeline_order[r] = [...]`` changes the mapping read, not a copy that is thrown away."""
    model, pipe, x, y = mlp_pipe(4, 2)
    lp = LocalPipeline(pipe, ScheduleInterleaved1F1B, num_ranks=2, n_microbatches=2,
                       loss_fn=torch.nn.functional.mse_loss)
    row = ["0F0", "0F1", "2F0", "2F1", "2B0", "0B0", "2B1", "0B1"]
    assert [str(a) for a in lp.schedules[0].pipeline_order[0]] != row
    lp.schedules[0].pipeline_order[0] = row
    check_mse_step(lp, model, x, y, atol=1e-12)
    assert [str(a) for a in lp.schedules[0].pipeline_order[0]] == row
    with pytest.raises(ValueError, match="no action at all"):
        lp.schedules[0]._validate_and_set_stage_mapping({})

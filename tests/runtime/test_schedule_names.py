"""PyTorch pipelining's schedule names and order loading: get_schedule_class, the Single/Multi bases, _load_csv."""

from __future__ import annotations

import pytest
import torch
from models import check_mse_step, mlp_pipe
from torch.distributed.pipelining.schedules import _Action, _ComputationType

import pippy
from pippy import PipelineScheduleMulti, PipelineScheduleSingle, get_schedule_class
from pippy.PipelineSchedule import _PipelineScheduleRuntime, _ScheduleForwardOnly
from pippy.runtime.local import LocalPipeline
from pippy.runtime.stage import StageError

PEER_NAMES = {  # PyTorch pipelining's get_schedule_class table, and whether each takes a list of stages
    "1F1B": False, "Interleaved1F1B": True, "GPipe": False, "LoopedBFS": True, "InterleavedZeroBubble": True,
    "ZBVZeroBubble": True, "DualPipeV": True, "PipelineScheduleSingle": False, "PipelineScheduleMulti": True,
}


@pytest.mark.parametrize("name", sorted(PEER_NAMES))
def test_peer_names_dispatch_like_the_peer(name: str) -> None:
    cls = get_schedule_class(name)
    assert get_schedule_class(name.upper()) is cls
    assert issubclass(cls, PipelineScheduleMulti) is PEER_NAMES[name]
    assert issubclass(cls, PipelineScheduleSingle) is not PEER_NAMES[name]


def test_pippy_names_and_unknown() -> None:
    assert get_schedule_class("zb_h1") is pippy.ScheduleZBH1
    assert get_schedule_class("ScheduleDualPipeV") is pippy.ScheduleDualPipeV
    assert get_schedule_class("interleaved_1f1b") is pippy.ScheduleInterleaved1F1B
    with pytest.raises(ValueError, match="unknown schedule name 'ZB'; known: 1F1B"):
        get_schedule_class("ZB")


@pytest.mark.parametrize("cls,n_stages,ranks", [
    (pippy.ScheduleInterleavedZeroBubble, 4, 2),
    (pippy.ScheduleInterleavedZeroBubble, 2, 2),  # one stage per rank: ZB-H1's order
    (pippy.ScheduleZBVZeroBubble, 4, 2),
])
def test_peer_named_schedules_are_transparent(cls: type, n_stages: int, ranks: int) -> None:
    model, pipe, x, y = mlp_pipe(n_stages, 4)
    lp = LocalPipeline(pipe, cls, num_ranks=ranks, n_microbatches=4, loss_fn=torch.nn.functional.mse_loss)
    check_mse_step(lp, model, x, y)
    assert {a.kind.value for row in lp.schedules[0].schedule.actions for a in row} >= {"F"}


def _loaded(n_stages: int, ranks: int, rows: dict[int, list[str]], cls: type = PipelineScheduleMulti,
            via_csv: str | None = None) -> tuple[LocalPipeline, torch.nn.Module, torch.Tensor, torch.Tensor]:
    model, pipe, x, y = mlp_pipe(n_stages, 4)
    lp = LocalPipeline(pipe, cls, num_ranks=ranks, n_microbatches=4, loss_fn=torch.nn.functional.mse_loss)
    for sched in lp.schedules:
        if via_csv is None:
            sched._load_actions(rows)
        else:
            sched._load_csv(via_csv, "compute_only")
    return lp, model, x, y


GPIPE_2 = {0: [f"0F{i}" for i in range(4)] + [f"0B{i}" for i in range(4)],
           1: [a for i in range(4) for a in (f"1F{i}", f"1B{i}")]}


def test_base_class_runs_the_loaded_order() -> None:
    lp, model, x, y = _loaded(2, 2, GPIPE_2)
    check_mse_step(lp, model, x, y)
    check_mse_step(lp, model, x, y)  # and again: the order stays loaded


def test_peer_actions_and_csv_cells_load(tmp_path) -> None:
    peer = {r: [_Action.from_str(a) for a in row] for r, row in GPIPE_2.items()}
    peer[0].insert(0, _Action(0, _ComputationType.UNSHARD, None))
    lp, model, x, y = _loaded(2, 2, peer)
    check_mse_step(lp, model, x, y)
    # PyTorch pipelining's CSV: split backward, an overlapped F/B cell and FSDP cells
    csv = tmp_path / "order.csv"
    csv.write_text("0UNSHARD,0F0,0F1,0F2,0F3,0I0,0W0,0I1,0I2,0I3,0W1,0W2,0W3,0RESHARD\n"
                   "1F0,(1F1;1B0)OVERLAP_F_B,1B1,1F2,1I2,1F3,1W2,1B3,1REDUCE_GRAD\n")
    lp, model, x, y = _loaded(2, 2, {}, via_csv=str(csv))
    check_mse_step(lp, model, x, y)
    dumped = tmp_path / "back.csv"
    lp.schedules[1]._dump_csv(dumped)
    lp2, model2, x2, y2 = _loaded(2, 2, {}, via_csv=str(dumped))
    check_mse_step(lp2, model2, x2, y2)


def test_runtime_class_and_refusals(tmp_path) -> None:
    model, pipe, x, y = mlp_pipe(2, 4)
    lp = LocalPipeline(pipe, _PipelineScheduleRuntime, num_ranks=2, n_microbatches=4,
                       loss_fn=torch.nn.functional.mse_loss)
    with pytest.raises(StageError, match="no order of its own yet: load one with _load_csv"):
        lp.step(x, target=y)
    with pytest.raises(ValueError, match="has 2 micro-batches but this schedule was built with n_microbatches=4"):
        lp.schedules[0]._load_actions({0: ["0F0", "0F1", "0B0", "0B1"], 1: ["1F0", "1B0", "1F1", "1B1"]})
    with pytest.raises(ValueError, match="format must be one of"):
        lp.schedules[0]._load_actions(GPIPE_2, format="simple")
    with pytest.raises(ValueError, match="rank 1: cannot parse action '1X0'"):
        lp.schedules[0]._load_actions({0: ["0F0"], 1: ["1X0"]})
    with pytest.raises(ValueError, match="1B0 missing: 1F0 has no complete backward"):
        lp.schedules[1]._load_actions({0: GPIPE_2[0], 1: [f"1F{i}" for i in range(4)]})
    csv = tmp_path / "o.csv"
    csv.write_text("\n".join(",".join(row) for row in GPIPE_2.values()) + "\n")
    for sched in lp.schedules:
        sched._load_csv(str(csv))  # its default format, compute_comms, reads a compute-only CSV too
    check_mse_step(lp, model, x, y)


def test_forward_only_schedule_steps_forward() -> None:
    from pippy.runtime.localcomm import LocalTransport

    model, pipe, x, y = mlp_pipe(1, 4)
    sched = _ScheduleForwardOnly(pipe.build_stage(0, "cpu"), 4, loss_fn=torch.nn.functional.mse_loss,
                                 transport=LocalTransport.world(1)[0])
    with torch.no_grad():
        ref = model(x)
    losses: list[torch.Tensor] = []
    torch.testing.assert_close(sched.step(x, target=y, losses=losses), ref, rtol=0, atol=1e-13)
    assert not losses and all(p.grad is None for p in sched.stages[0].parameters())  # a loss_fn, yet no backward


def test_an_order_is_checked_as_written() -> None:
    _model, pipe, _x, _y = mlp_pipe(2, 4)
    lp = LocalPipeline(pipe, PipelineScheduleMulti, num_ranks=2, n_microbatches=4, loss_fn=torch.nn.functional.mse_loss)
    for sched in lp.schedules:
        sched._load_actions(GPIPE_2)
    before = [sched._dump_actions("compute_comms") for sched in lp.schedules]
    rows = {0: GPIPE_2[0], 1: ["1F0", "1B0", "1I0", "1W0", *GPIPE_2[1][2:]]}  # 1B0 and a split backward of it too
    with pytest.raises(ValueError, match=r"stage 1 micro-batch 0 has both a full backward B and a split one \(I/W\)"):
        lp.schedules[1]._load_actions(rows)
    with pytest.raises(ValueError, match="0W0 needs 0I0 first"):  # W before I: refused though stage 0 would fuse them
        lp.schedules[0]._load_actions({0: ["0F0", "0W0", "0I0"] + [a for i in (1, 2, 3) for a in (f"0F{i}", f"0B{i}")],
                                       1: GPIPE_2[1]})
    assert [sched._dump_actions("compute_comms") for sched in lp.schedules] == before  # failed loads change nothing


def test_loss_fn_assigned_after_construction_is_used() -> None:
    """Frameworks swap the loss on a built schedule (``sched._loss_fn = fn``, PyTorch pipelining's name)."""
    model, pipe, x, y = mlp_pipe(2, 4)
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=torch.nn.functional.mse_loss)

    def doubled(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return 2 * torch.nn.functional.mse_loss(out, tgt)

    for sched in lp.schedules:
        sched._loss_fn = doubled
        assert sched.loss_fn is doubled and sched._has_backward and sched._n_microbatches == 4
    losses: list[torch.Tensor] = []
    lp.step(x, target=y, losses=losses)
    doubled(model(x), y).backward()
    torch.testing.assert_close(torch.stack(losses).mean(), doubled(model(x), y).detach(), rtol=1e-12, atol=0)
    grads = lp.named_grads()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-13)
    assert [str(a) for a in lp.schedules[1].pipeline_order[1]][:2] == ["1F0", "1B0"]
    with pytest.raises(NotImplementedError, match="has no hook to replace one"):
        lp.schedules[0].register_custom_function("OVERLAP_F_B", lambda action, ctx: None)

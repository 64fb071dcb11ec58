"""A rank that finished the step another rank failed in is told its stages are one update ahead (2 gloo ranks)."""

from __future__ import annotations

import time
from typing import Any

import torch
from harness import run_ranks
from models import MLPStack, mse

import pippy
from pippy import SplitPoint, pipeline

M = 4


def _skew(rank: int, world: int) -> list[str]:
    torch.manual_seed(0)
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    pipe = pipeline(MLPStack(4).double(), M, (x,), split_spec={"blocks.1": SplitPoint.END})
    stage = pipe.build_stage(rank, "cpu")
    sched = pippy.Schedule1F1B(stage, M, loss_fn=mse)
    steps, inner = [0], stage.backward

    def backward(mb: int, grads: Any) -> Any:  # rank 0's last backward of step 2 fails, after rank 1 has finished
        if rank == 0 and steps[0] == 2 and mb == M - 1:
            time.sleep(1.0)
            raise ValueError("injected failure in the last backward")
        return inner(mb, grads)

    stage.backward = backward  # type: ignore[method-assign]
    said = []
    for steps[0] in (1, 2, 3):
        try:
            sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None)
            said.append("ok")
        except Exception as exc:
            said.append(f"{type(exc).__name__}: {exc}\n" + "\n".join(getattr(exc, "__notes__", [])))
            break
    return said


def test_a_rank_ahead_of_the_failed_step_is_told(tmp_path) -> None:
    rank0, rank1 = run_ranks(tmp_path, 2, _skew)
    assert rank0[:1] == ["ok"] and rank0[1].startswith("ValueError: injected failure"), rank0
    assert rank1[:2] == ["ok", "ok"] and rank1[2].startswith("PipeAbortedError"), rank1
    assert "That rank says: rank 0, in its step 2, stage 0, action 0B3" in rank1[2], rank1[2]
    assert "rank 0 failed in its step 2, which this rank had finished (this is its step 3, eval() calls counted): if an " \
        "optimizer step ran after it" in rank1[2], rank1[2]


def _disagree_then_rebuild(rank: int, world: int) -> tuple[str, float]:
    """Rank 1 arrives late with another micro-batch count: it refuses, rank 0 is stopped mid-step; both rebuild."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    model = MLPStack(4).double()
    inputs, target = ((x,) if rank == 0 else ()), (y if rank == 1 else None)
    pipe = pipeline(model, M, (x,), split_spec={"blocks.1": SplitPoint.END})
    stage = pipe.build_stage(rank, "cpu")
    if rank == 1:
        time.sleep(1.0)  # rank 0 starts its step first
    first = "ok"
    try:
        pippy.Schedule1F1B(stage, M if rank == 0 else 2, loss_fn=mse).step(*inputs, target=target)
    except Exception as exc:
        first = type(exc).__name__
    stage.submod.zero_grad(set_to_none=True)
    pippy.Schedule1F1B(stage, M, loss_fn=mse).step(*inputs, target=target)  # every rank's next schedule agrees
    mse(model(x), y).backward()
    ref = dict(model.named_parameters())
    return first, max(float((p.grad - ref[n].grad).abs().max()) for n, p in stage.submod.named_parameters())


def test_ranks_that_disagreed_rebuild_together(tmp_path) -> None:
    (said0, err0), (said1, err1) = run_ranks(tmp_path, 2, _disagree_then_rebuild)
    assert said0 == "PipeAbortedError" and said1 == "StageError", (said0, said1)
    assert max(err0, err1) < 1e-12, (err0, err1)


def _two_pipes_swapped(rank: int, world: int) -> list[str]:
    """Two pipelines of one architecture over the same ranks: one step each in the same order, then rank 1 swaps."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    inputs, target = ((x,) if rank == 0 else ()), (y if rank == 1 else None)
    scheds = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        pipe = pipeline(MLPStack(4).double(), M, (x,), split_spec={"blocks.1": SplitPoint.END})
        scheds.append(pippy.Schedule1F1B(pipe.build_stage(rank, "cpu"), M, loss_fn=mse, timeout=5))
    said = []
    for sched in scheds + (scheds if rank == 0 else scheds[::-1]):
        try:
            sched.step(*inputs, target=target)
            said.append("ok")
        except Exception as exc:
            said.append(f"{type(exc).__name__}: {exc}")
            break
    return said


def test_two_pipelines_stepped_in_different_orders_time_out(tmp_path) -> None:
    """Their messages shared tags: each took the other's activations and trained silently wrong (grads off 0.06)."""
    for said in run_ranks(tmp_path, 2, _two_pipes_swapped):
        assert said[:2] == ["ok", "ok"] and said[2].startswith("PipeTimeoutError"), said
        assert "stepped two pipelines over the same ranks in different orders" in said[2], said

"""Spawned-rank case for PipelineGradScaler: an overflow on one pipeline rank makes every rank skip, scales stay equal."""

from __future__ import annotations

from typing import Any

import torch
from models import MLPStack, mse

import pippy
from pippy import SplitPoint, pipeline


def scaler_on_ranks(rank: int, world: int) -> dict[str, Any]:
    """Three 1F1B steps of a 2-stage MLP with a scaled loss; in step 2 the last stage's gradients hold an inf (an
    fp16 overflow there, which leaves the first stage's gradients finite)."""
    torch.manual_seed(0)
    model = MLPStack(n=2, d=8).double()
    x, y = torch.randn(8, 3, 8, dtype=torch.float64), torch.randn(8, 3, 4, dtype=torch.float64)
    pipe = pipeline(model, 2, (x,), split_spec={"blocks.0": SplitPoint.END})
    stage = pipe.build_stage(rank, "cpu")
    opt = torch.optim.SGD(stage.submod.parameters(), lr=0.1)
    scaler = pippy.PipelineGradScaler("cpu", init_scale=8.0)
    sched = pippy.Schedule1F1B(stage, 2, loss_fn=lambda out, t: scaler.scale(mse(out, t)))
    out: dict[str, Any] = {"scales": [], "stepped": []}
    for step in range(3):
        opt.zero_grad()
        sched.step(*((x,) if rank == 0 else ()), target=y if rank == world - 1 else None)
        if step == 1 and rank == world - 1:
            next(iter(stage.submod.parameters())).grad[0] = float("inf")
        before = [p.detach().clone() for p in stage.submod.parameters()]
        scaler.step(opt)
        scaler.update()
        out["stepped"].append(any(not torch.equal(b, p) for b, p in zip(before, stage.submod.parameters())))
        out["scales"].append(scaler.get_scale())
    return out

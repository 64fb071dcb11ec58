"""An order loaded between steps (``_load_actions`` / ``_load_csv``) runs from the next step on every rank (2 gloo ranks)."""

from __future__ import annotations

import torch
from harness import run_ranks
from models import MLPStack, mse

import pippy
from pippy import SplitPoint, pipeline
from pippy.schedules.generators import gpipe

M = 4


def _reload(rank: int, world: int) -> float:
    torch.manual_seed(0)
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    model = MLPStack(4).double()
    pipe = pipeline(model, M, (x,), split_spec={"blocks.1": SplitPoint.END})
    stage = pipe.build_stage(rank, "cpu")
    sched = pippy.Schedule1F1B(stage, M, loss_fn=mse)
    inputs = ((x,) if rank == 0 else ())
    sched.step(*inputs, target=y if rank == 1 else None)
    sched._load_actions({r: [str(a) for a in row] for r, row in enumerate(gpipe(world, M).actions)})
    sched.step(*inputs, target=y if rank == 1 else None)  # grads accumulate over both steps
    mse(model(x), y).backward()
    mse(model(x), y).backward()
    ref = dict(model.named_parameters())
    return max(float((p.grad - ref[n].grad).abs().max()) for n, p in stage.submod.named_parameters())


def test_an_order_loaded_after_a_step_runs_on_every_rank(tmp_path) -> None:
    errs = run_ranks(tmp_path, 2, _reload)
    assert max(errs) < 1e-12, errs

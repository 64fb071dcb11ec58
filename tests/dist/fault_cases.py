"""Fault scenarios run on spawned ranks: each gets a fresh gloo group, fails on purpose, and reports how every rank ended.

A worker runs the scenarios one after another (one torch import for all of them). Each rank
reports, per scenario, how its step ended (the exception type and message with its notes) and
the wall-clock time it ended at; the failing rank also reports when it failed. SIGKILL comes
last, since it ends the killed process.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from models import MLPStack, mse

import pippy
from pippy import SplitPoint, pipeline

TIMEOUT = 4.0  # PIPPY_TIMEOUT in these runs: every rank must end within TIMEOUT + 10 s
SCENARIOS = (
    "never_steps", "raise_forward", "raise_backward", "disagree_microbatches", "disagree_schedule",
    "disagree_split", "disagree_order", "wrong_shape", "wrong_dtype", "nan_loss", "group_destroyed", "spare_schedule",
    "eval_vs_step", "build_fails", "sigkill",
)
MULTI = {"1f1b": (pippy.Schedule1F1B, 1), "interleaved": (pippy.ScheduleInterleaved1F1B, 2)}
M = 4  # micro-batches


def _build(rank: int, world: int, family: str, *, m: int = M, cls: Any = None, shift: int = 0, **opts: Any) -> Any:
    """This rank's schedule over an MLP cut into world * stages-per-rank stages (``shift`` moves the cuts)."""
    base, v = MULTI[family]
    n = world * v
    torch.manual_seed(0)
    model = MLPStack(2 * n).double()
    spec = {f"blocks.{2 * k + 1 + shift}": SplitPoint.END for k in range(n - 1)}
    x = torch.randn(8, 8, dtype=torch.float64)
    pipe = pipeline(model, m, (x,), split_spec=spec)
    sched_cls = cls or base
    place = sched_cls.placement(world, v)
    stages = [pipe.build_stage(s, "cpu") for s in range(pipe.num_stages) if place[s] == rank]
    sched = sched_cls(stages if v > 1 else stages[0], m, loss_fn=mse, **opts)
    return sched, stages, x, torch.randn(8, 4, dtype=torch.float64)


def _step(sched: Any, rank: int, x: torch.Tensor, y: torch.Tensor) -> None:
    first, last = sched.holds(0), sched.holds(sched.pipe.num_stages - 1)
    sched.step(*((x,) if first else ()), target=y if last else None)


def _wrap_forward(stage: Any, fn: Any) -> None:
    """Call ``fn(call_number, outputs)`` after each forward of ``stage``; its result replaces the outputs."""
    inner, calls = stage.submod.forward, [0]

    def forward(*args: Any) -> Any:
        out = inner(*args)
        calls[0] += 1
        return fn(calls[0], out)

    stage.submod.forward = forward


def _victim(world: int) -> int:
    return world - 1  # the rank whose stage misbehaves


def run(rank: int, world: int, family: str, name: str, failed_at: list[float]) -> str | None:
    """Run scenario ``name`` on this rank; returns None if this rank's step ended normally."""
    victim = rank == _victim(world)

    def mark() -> None:
        failed_at.append(time.time())

    if name == "never_steps":
        sched, _, x, y = _build(rank, world, family)
        if victim:
            mark()
            return "skipped step() on purpose"
        _step(sched, rank, x, y)
    elif name in ("raise_forward", "raise_backward", "wrong_shape", "wrong_dtype", "sigkill", "spare_schedule"):
        if victim and name == "spare_schedule":  # built and never used: must not move this rank's failure board
            _build(rank, world, family)
        sched, stages, x, y = _build(rank, world, family)
        if victim:
            def bad(k: int, out: Any) -> Any:
                if k != 3:  # the third forward of this stage (micro-batch 2 on one-stage ranks)
                    return out
                mark()
                if name in ("raise_forward", "spare_schedule"):
                    raise ValueError("injected failure in forward")
                if name == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if name == "raise_backward":
                    def hook(g: torch.Tensor) -> torch.Tensor:
                        mark()
                        raise ValueError("injected failure in backward")

                    out[0].register_hook(hook)
                    return out
                t = out[0]
                t = torch.cat([t, t[:1]]) if name == "wrong_shape" else t.float()
                return (t, *out[1:])

            _wrap_forward(stages[0], bad)
        _step(sched, rank, x, y)
    elif name == "eval_vs_step":  # the victim validates where the others train: no rank may take the others' messages
        sched, _, x, y = _build(rank, world, family)
        if victim:
            mark()
            first = sched.holds(0)
            sched.eval(*((x,) if first else ()))
        else:
            _step(sched, rank, x, y)
    elif name == "disagree_microbatches":
        sched, _, x, y = _build(rank, world, family, m=2 if victim else M)
        if victim:
            mark()
        _step(sched, rank, x, y)
    elif name == "disagree_schedule":
        other = pippy.ScheduleGPipe if family == "1f1b" else pippy.ScheduleLoopedBFS
        sched, _, x, y = _build(rank, world, family, cls=other if victim else None)
        if victim:
            mark()
        _step(sched, rank, x, y)
    elif name == "disagree_order":  # the victim loads another order of the same placement
        from pippy.schedules.generators import gpipe, looped_bfs

        sched, _, x, y = _build(rank, world, family)
        if victim:
            other = gpipe(world, M) if family == "1f1b" else looped_bfs(world, M, v=MULTI[family][1])
            sched._load_actions({r: [str(a) for a in row] for r, row in enumerate(other.actions)})
            mark()
        _step(sched, rank, x, y)
    elif name == "build_fails":  # the victim's schedule fails while it is built; its process stays alive
        base = MULTI[family][0]
        if victim:
            def make(self: Any, p: int) -> Any:
                mark()
                raise ValueError("injected failure building the schedule")

            _build(rank, world, family, cls=type("Broken", (base,), {"_make": make}))
        sched, _, x, y = _build(rank, world, family)
        _step(sched, rank, x, y)
    elif name == "disagree_split":
        sched, _, x, y = _build(rank, world, family, shift=1 if victim else 0)
        if victim:
            mark()
        _step(sched, rank, x, y)
    elif name == "nan_loss":
        sched, _, x, y = _build(rank, world, family, check_finite=True)
        y = y.clone()
        y[5] = float("nan")  # micro-batch 2 of 4
        if sched.holds(sched.pipe.num_stages - 1):
            mark()
        _step(sched, rank, x, y)
    elif name == "group_destroyed":
        sched, _, x, y = _build(rank, world, family)
        if rank == 0:
            threading.Timer(0.5, lambda: (mark(), dist.destroy_process_group())).start()
        else:
            time.sleep(1.5)  # keep rank 0 waiting for this rank while its group goes away
        _step(sched, rank, x, y)
    return None


def worker(rank: int, world: int, family: str, root: str, q: Any) -> None:
    """Every scenario in turn, each on its own process group; results go to ``q``."""
    os.environ["PIPPY_TIMEOUT"] = str(TIMEOUT)
    torch.set_num_threads(1)
    for name in SCENARIOS:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(root, name), world), rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        failed_at: list[float] = []
        start = time.time()
        try:
            skipped = run(rank, world, family, name, failed_at)
            status, text = ("skipped", skipped) if skipped else ("ok", "")
        except Exception as exc:
            notes = "\n".join(getattr(exc, "__notes__", []))
            status, text = type(exc).__name__, f"{exc}\n{notes}\n{traceback.format_exc(limit=3)}"
        q.put((name, rank, status, text, start, time.time(), failed_at[0] if failed_at else None))
        if dist.is_initialized():
            dist.destroy_process_group()

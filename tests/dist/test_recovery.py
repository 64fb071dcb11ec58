"""After a failed step, a new schedule on the same process group trains exactly (the old step's messages stay apart)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from harness import run_ranks
from models import MLPStack, mse

import pippy
from pippy import SplitPoint, pipeline

M = 4


def _fresh(rank: int, world: int, cls: Any) -> tuple[Any, list[Any], torch.Tensor, torch.nn.Module]:
    """This rank's schedule (``cls``) over a new pipe of a seeded MLP: one or two stages per rank."""
    torch.manual_seed(0)
    model = MLPStack(2 * world).double()
    per_rank = 1 if cls is pippy.Schedule1F1B else 2
    n = per_rank * world
    spec = {f"blocks.{2 * world // n * (i + 1) - 1}": SplitPoint.END for i in range(n - 1)}
    x = torch.randn(8, 8, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), M, (x,), split_spec=spec)
    placement = cls.placement(world, per_rank)
    stages = [pipe.build_stage(s, "cpu") for s in range(n) if placement[s] == rank]
    sched = cls(stages if per_rank > 1 else stages[0], M, loss_fn=mse)
    return sched, stages, x, model


def _fails_then_recovers(rank: int, world: int) -> list[str]:
    out = []
    for cls in (pippy.Schedule1F1B, pippy.ScheduleInterleaved1F1B, pippy.ScheduleZBV):
        for fault in ("target", "forward"):
            sched, stages, x, _ = _fresh(rank, world, cls)
            y = torch.randn(8, 4, dtype=torch.float64)
            last = sched.pipe.num_stages - 1
            if fault == "target" and sched.holds(last):
                y = torch.randn(8, 3, dtype=torch.float64)  # a wrong target: the loss fails on micro-batch 0
            if fault == "forward" and rank == 0:  # the third forward of stage 0 raises, after messages went out
                calls = [0]
                real = stages[0].forward

                def bad(*a: Any, **k: Any) -> Any:
                    calls[0] += 1
                    if calls[0] == 3:
                        raise ValueError("injected")
                    return real(*a, **k)

                stages[0].forward = bad  # type: ignore[method-assign]
            try:
                sched.step(*((x,) if sched.holds(0) else ()), target=y)
                out.append(f"{cls.__name__} {fault}: the failing step did not fail")
                continue
            except Exception:
                pass
            sched, stages, x, model = _fresh(rank, world, cls)  # a new pipe and schedule on the same group
            y = torch.randn(8, 4, dtype=torch.float64)
            got = sched.step(*((x,) if sched.holds(0) else ()), target=y)
            ref = copy.deepcopy(model)
            want = ref(x)
            mse(want, y).backward()
            if sched.holds(last):
                assert torch.allclose(got, want, atol=1e-12), (cls.__name__, fault)
            params = dict(ref.named_parameters())
            for st in stages:
                for name, p in st.submod.named_parameters():
                    assert torch.allclose(p.grad, params[name].grad, atol=1e-12), (cls.__name__, fault, name)
            out.append(f"{cls.__name__} {fault}: ok")
    return out


def test_a_new_schedule_after_a_failed_step_is_exact(tmp_path) -> None:
    for res in run_ranks(tmp_path, 2, _fails_then_recovers, timeout=400):
        assert all(r.endswith(": ok") for r in res), res

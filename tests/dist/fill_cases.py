"""Run-time bubble filling over real gloo ranks: pollable receives, and results bitwise those of the static order."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.distributed as dist
from cases import MULTI, SINGLE, build

from pippy import pipeline
from pippy.runtime.comm import DistTransport, WaitContext


def arrival(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 posts a receive, sees it not arrived, then (after rank 1 sends) sees it arrive before waiting."""
    t = DistTransport(timeout=30)
    buf = torch.zeros(1024)
    res: dict[str, Any] = {}
    if rank == 0:
        h = t.irecv(buf, 1, tag=5)
        res["before"] = t.arrived(h)
        dist.barrier()
        deadline = time.monotonic() + 20
        while not t.arrived(h) and time.monotonic() < deadline:
            time.sleep(0.01)
        res["after"] = t.arrived(h)
        for _ in t.wait(h, WaitContext(0, 0, "RECV_F", 0, 1)):
            pass
        res["value"] = float(buf.sum())
    else:
        dist.barrier()
        for _ in t.wait(t.isend(torch.ones(1024), 0, tag=5), WaitContext(1, 1, "SEND_F", 0, 0)):
            pass
    dist.barrier()
    return res


def filled_vs_static(rank: int, world: int, cases: list[tuple[str, str, int]], steps: int = 4, n_mb: int = 8) -> dict[str, Any]:
    """Per (model, schedule, stages per rank): steps with and without filling; are all grads bitwise equal?"""
    report: dict[str, Any] = {}
    for model_name, sched_name, spr in cases:
        n_stages = world * spr
        model, args, kwargs, target, loss_fn, opts = build(model_name, n_stages)
        cls = SINGLE.get(sched_name) or MULTI[sched_name]
        placement = cls.placement(world, spr)
        first, last = placement[0] == rank, placement[-1] == rank
        grads: dict[bool, list[dict[str, torch.Tensor]]] = {}
        moved = 0
        for fill in (False, True):
            pipe = pipeline(copy.deepcopy(model), n_mb, example_args=args, example_kwargs=kwargs, **opts)
            mine = [pipe.build_stage(s, "cpu") for s in range(n_stages) if placement[s] == rank]
            sched = cls(mine[0] if spr == 1 and sched_name in SINGLE else mine, n_mb, loss_fn=loss_fn, fill_bubbles=fill)
            grads[fill] = []
            for _ in range(steps):
                for st in mine:
                    st.submod.zero_grad(set_to_none=True)
                sched.step(*(args if first else ()), target=target if last else None, **(kwargs if first else {}))
                grads[fill].append({n: p.grad.clone() for st in mine for n, p in st.submod.named_parameters() if p.grad is not None})
                if fill:
                    moved += sum(len(ex.filler.ran) for ex in sched._executors.values())
            dist.barrier()
        same = all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(grads[False], grads[True]))
        report[f"{model_name}/{sched_name}/{spr}"] = {"bitwise": same, "moved": moved, "n": len(grads[True][-1])}
    return report

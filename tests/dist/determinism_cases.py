"""Determinism on real ranks: the same seed twice gives bitwise the same losses and gradients, filling on."""

from __future__ import annotations

import torch
from cases import MULTI, SINGLE, build

from pippy import pipeline


def _run_once(rank: int, world: int, name: str, cls: type, v: int, dtype: torch.dtype) -> tuple[list, dict]:
    model, args, _, target, loss_fn, opts = build("skip", world * v)
    model = model.to(dtype)
    args = tuple(a.to(dtype) for a in args)
    target = target.to(dtype)
    pipe = pipeline(model, 4, example_args=args, **opts)
    place = cls.placement(world, v)
    stages = [pipe.build_stage(s, "cpu") for s in range(pipe.num_stages) if place[s] == rank]
    sched = cls(stages if v > 1 else stages[0], 4, loss_fn=loss_fn, fill_bubbles=True)
    losses: list[torch.Tensor] = []
    for _ in range(2):  # two steps: the second may move W's by the first one's waits
        first, last = sched.holds(0), sched.holds(pipe.num_stages - 1)
        sched.step(*(args if first else ()), target=target if last else None, losses=losses)
    grads = {f"{st.index}:{n}": p.grad.clone() for st in stages for n, p in st.submod.named_parameters()}
    return [x.clone() for x in losses], grads


def same_seed_twice(rank: int, world: int) -> dict[str, bool]:
    """For every schedule and dtype: run twice from the same seed and compare bit for bit."""
    out: dict[str, bool] = {}
    for table, v in ((SINGLE, 1), (MULTI, 2)):
        for name, cls in table.items():
            for dtype in (torch.float32, torch.float64):
                a_losses, a_grads = _run_once(rank, world, name, cls, v, dtype)
                b_losses, b_grads = _run_once(rank, world, name, cls, v, dtype)
                same = all(torch.equal(x, y) for x, y in zip(a_losses, b_losses)) and len(a_losses) == len(b_losses)
                same = same and a_grads.keys() == b_grads.keys()
                same = same and all(torch.equal(a_grads[k], b_grads[k]) for k in a_grads)
                out[f"{name}/{dtype}"] = same
    return out

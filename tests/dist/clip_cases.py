"""Spawned-rank case for clip_grad_norm_: each pipeline rank clips its own stages by the one global norm."""

from __future__ import annotations

import copy
from typing import Any

import torch
from models import gpt2, lm_loss

import pippy
from pippy import SplitPoint, pipeline


def clip_on_ranks(rank: int, world: int, mode: str, v: int) -> dict[str, Any]:
    """GPT-2 (tied head) on ``world`` ranks with ``v`` stages each; clip at 0.05 and compare with the plain model."""
    torch.manual_seed(0)
    model = gpt2(n_layer=2 * world * v - 1).double()
    ref = copy.deepcopy(model)
    x, y = torch.randint(0, 96, (4, 16)), torch.randint(0, 96, (4, 16))
    lm_loss(ref(x), y).backward()
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=0.05)
    n = world * v
    spec = {f"transformer.h.{2 * k}": SplitPoint.END for k in range(n - 1)}
    pipe = pipeline(model, 2, (x,), split_spec=spec, tied_weights=mode)
    cls = pippy.Schedule1F1B if v == 1 else pippy.ScheduleInterleaved1F1B
    place = cls.placement(world, v)
    stages = [pipe.build_stage(s, "cpu") for s in range(n) if place[s] == rank]
    sched = cls(stages if v > 1 else stages[0], 2, loss_fn=lm_loss)
    sched.step(*((x,) if sched.holds(0) else ()), target=y if sched.holds(n - 1) else None)
    got = pippy.clip_grad_norm_(sched, max_norm=0.05)
    err = 0.0
    for st in stages:
        for name, p in st.submod.named_parameters():
            if p.grad is not None:
                err = max(err, float((p.grad - ref.get_parameter(name).grad).abs().max()))
    return {"norm": float(got), "want": float(want), "grad_err": err}

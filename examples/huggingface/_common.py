"""Shared driver for the Hugging Face examples: pipeline a model, train a few steps, check against one process.

Each rank keeps an unpipelined reference copy, trains it on the full batch with the same optimizer,
and compares its own stage's gradients and parameters (by original FQN) after every step.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import pippy
from pippy.hf import split_spec_equal_layers


def init() -> tuple[int, int]:
    """Join the torchrun process group (gloo on CPU); return (rank, world size)."""
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.get_world_size()))
    return dist.get_rank(), dist.get_world_size()


def train_and_check(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    target: Any = None,
    n_microbatches: int = 4,
    steps: int = 3,
    lr: float = 0.05,
    stages_per_rank: int = 1,
) -> float:
    """Train ``model`` pipelined for ``steps`` steps; print and return the worst grad/param difference."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = model.double().eval()  # float64, dropout off, BatchNorm uses running stats (transparent)
    ref = copy.deepcopy(model)
    n_stages = world * stages_per_rank
    spec = split_spec_equal_layers(model, n_stages)
    pipe = pippy.pipeline(model, n_microbatches, args, kwargs, split_spec=spec)
    if rank == 0:
        print(pipe)
    cls = pippy.Schedule1F1B if stages_per_rank == 1 else pippy.ScheduleInterleaved1F1B
    placement = cls.placement(world, stages_per_rank)
    mine = [pipe.build_stage(s, "cpu") for s in range(n_stages) if placement[s] == rank]
    sched = cls(mine[0] if stages_per_rank == 1 else mine, n_microbatches, loss_fn=loss_fn)
    params = [p for st in mine for p in st.parameters()]
    opt = torch.optim.SGD(params, lr=lr)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr)
    first, last = placement[0] == rank, placement[-1] == rank
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    worst = 0.0
    for step in range(steps):
        opt.zero_grad()
        ref_opt.zero_grad()
        out_ref = ref(*args, **kwargs)
        loss_ref = loss_fn(out_ref, target) if loss_fn is not None else out_ref.loss
        loss_ref.backward()
        losses: list[torch.Tensor] = []
        sched.step(*(args if first else ()), target=target if last else None, losses=losses, **(kwargs if first else {}))
        grad_diff = 0.0
        for st in mine:
            for fqn, p in st.submod.named_parameters(remove_duplicate=False):
                want = ref_params[fqn].grad
                if want is not None and p.grad is not None:
                    grad_diff = max(grad_diff, float((p.grad - want).abs().max()))
        opt.step()
        ref_opt.step()
        worst = max(worst, grad_diff)
        if last:
            print(f"step {step}: loss {float(torch.stack(losses).mean()):.6f} (unpipelined {loss_ref.item():.6f})")
        print(f"  rank {rank} step {step}: max grad diff vs unpipelined = {grad_diff:.3e}")
    with torch.no_grad():
        param_diff = max(
            float((p - ref_params[fqn]).abs().max()) for st in mine for fqn, p in st.submod.named_parameters()
        )
    print(f"rank {rank}: after {steps} SGD steps max param diff = {param_diff:.3e}, max grad diff = {worst:.3e}")
    ok = max(worst, param_diff) < 1e-9
    print(f"rank {rank}: {'OK' if ok else 'MISMATCH'} (pipelined == unpipelined)")
    dist.destroy_process_group()
    return max(worst, param_diff)

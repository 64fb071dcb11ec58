"""HF zoo cases run inside spawned ranks (world size 2): pipelined vs unpipelined, float64."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from zoo_models import build, max_err

import pippy
from pippy.hf import split_spec_equal_layers

SCHEDULES = {"gpipe": pippy.ScheduleGPipe, "1f1b": pippy.Schedule1F1B, "zb_h1": pippy.ScheduleZBH1,
             "interleaved_1f1b": pippy.ScheduleInterleaved1F1B}


def zoo_transparency(rank: int, world: int, cases: list[tuple[str, str, int]]) -> dict[str, dict[str, float]]:
    """For each (model, schedule, stages per rank): this rank's output/loss/grad errors and covered params."""
    report: dict[str, dict[str, float]] = {}
    for name, sched_name, spr in cases:
        case = build(name)
        ref = copy.deepcopy(case.model)
        out_ref = ref(*case.args, **case.kwargs)
        loss_ref = case.loss_fn(out_ref, case.target) if case.loss_fn else out_ref.loss
        loss_ref.backward()
        n_stages, n_mb = world * spr, 4
        spec = split_spec_equal_layers(case.model, n_stages, case.layers)
        pipe = pippy.pipeline(case.model, n_mb, case.args, case.kwargs, split_spec=spec)
        cls = SCHEDULES[sched_name]
        placement = cls.placement(world, spr)
        mine = [pipe.build_stage(s, "cpu") for s in range(n_stages) if placement[s] == rank]
        sched = cls(mine[0] if spr == 1 else mine, n_mb, loss_fn=case.loss_fn)
        first, last = placement[0] == rank, placement[-1] == rank
        losses: list[torch.Tensor] = []
        args: Any = case.args if first else ()
        kwargs: dict[str, Any] = case.kwargs if first else {}
        out = sched.step(*args, target=case.target if last else None, losses=losses, **kwargs)
        r: dict[str, float] = {}
        if last:
            r["loss"] = abs(float(torch.stack(losses).mean()) - float(loss_ref))
            r["loss_f32"] = float(loss_ref.dtype == torch.float32)
            r["out"] = max_err(out, out_ref)
        ref_params = dict(ref.named_parameters(remove_duplicate=False))
        g_err, n = 0.0, 0
        for st in mine:
            for fqn, p in st.submod.named_parameters(remove_duplicate=False):
                want = ref_params[fqn].grad
                if want is None:
                    continue
                assert p.grad is not None, f"{name}: no grad for {fqn} on rank {rank}"
                g_err = max(g_err, float((p.grad - want).abs().max()))
                n += 1
        r["grad"], r["n_params"] = g_err, float(n)
        report[f"{name}/{sched_name}/{spr}"] = r
        dist.barrier()
    return report


def checkpoint_roundtrip(rank: int, world: int, root: str) -> dict[str, float]:
    """Train GPT-2 two Adam steps on 2 ranks, save per rank (torch and dcp), merge, load back; return errors."""
    import os

    from pippy import checkpoint

    case = build("gpt2")
    ref = copy.deepcopy(case.model)
    pipe = pippy.pipeline(case.model, 2, case.args, case.kwargs, split_spec=split_spec_equal_layers(case.model, 2))
    stage = pipe.build_stage(rank, "cpu")
    sched = pippy.Schedule1F1B(stage, 2)
    opt = torch.optim.Adam(stage.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        ref_opt.zero_grad()
        sched.step(*(case.args if rank == 0 else ()), **(case.kwargs if rank == 0 else {}))
        ref(*case.args, **case.kwargs).loss.backward()
        opt.step()
        ref_opt.step()
    out: dict[str, float] = {}
    want = dict(ref.named_parameters(remove_duplicate=False))
    for fmt in ("torch", "dcp"):
        path = os.path.join(root, fmt)
        checkpoint.save(stage, path, format=fmt)
        dist.barrier()
        merged = checkpoint.merge(path, model=ref)
        fresh = copy.deepcopy(ref)
        fresh.load_state_dict(merged, strict=True)
        out[f"merge_{fmt}"] = max(float((p - want[n]).abs().max()) for n, p in fresh.named_parameters())
        before = {k: v.clone() for k, v in stage.submod.state_dict().items()}
        for p in stage.parameters():
            p.data.zero_()
        checkpoint.load(stage, path, format=fmt)
        out[f"load_{fmt}"] = max(float((v - before[k]).abs().max()) for k, v in stage.submod.state_dict().items())
        dist.barrier()
    return out


def zoo_world2(rank: int, world: int, cases: list[tuple[str, str, int]], root: str) -> dict[str, Any]:
    """Both checks in one spawn (importing transformers dominates a spawn's cost)."""
    return {"zoo": zoo_transparency(rank, world, cases), "ckpt": checkpoint_roundtrip(rank, world, root)}

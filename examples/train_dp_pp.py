"""Data x pipeline parallel training of a small Llama (from config, float64): FSDP2 on each stage, checked against the plain model.

Run:  .venv/bin/torchrun --nproc-per-node 4 examples/train_dp_pp.py --dp 2 --pp 2 [--steps 3] [--schedule 1f1b]
Across hosts (2 hosts x 2 processes, same command on each host):
      torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST0:29400 \\
          examples/train_dp_pp.py --dp 2 --pp 2

The mesh is (dp, pp). Every rank builds the same plain model, traces it on its own DP share of
the batch, builds its pipeline stage, shards each decoder block of that stage and then the stage
itself over its DP group with ``fully_shard``, and trains with AdamW. Each step prints a progress line; at the end every parameter is gathered
and compared with the same AdamW steps on the unpipelined model over the global batch.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import pippy
from pippy import pipeline
from pippy.hf import split_spec_equal_layers

SCHEDULES = {"gpipe": pippy.ScheduleGPipe, "1f1b": pippy.Schedule1F1B}


def lm_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy (mean over tokens), in the model's dtype."""
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), target.reshape(-1))


lm_loss.reduction = "mean"  # type: ignore[attr-defined]  # tells pippy how it reduces


def make_model(layers: int) -> LlamaForCausalLM:
    """A tiny Llama, float64, seeded: every rank builds the same weights."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).double()


def global_batch(step: int, size: int, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic token batch and its next-token targets."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 128, (size, seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="rows per DP rank")
    ap.add_argument("--schedule", choices=sorted(SCHEDULES), default="1f1b")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    if world != args.dp * args.pp:
        raise SystemExit(f"--dp {args.dp} x --pp {args.pp} = {args.dp * args.pp} ranks, but torchrun started {world}")
    mesh = init_device_mesh("cpu", (args.dp, args.pp), mesh_dim_names=("dp", "pp"))
    dp, pp = mesh["dp"].get_local_rank(), mesh["pp"].get_local_rank()
    torch.set_num_threads(1)

    model = make_model(layers=2 * args.pp)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    x0, _ = global_batch(0, args.dp * args.batch)
    mine0 = x0.chunk(args.dp)[dp]
    pipe = pipeline(model, args.microbatches, (mine0,), split_spec=split_spec_equal_layers(model, args.pp))
    stage = pipe.build_stage(pp, "cpu", group=mesh["pp"].get_group())
    for block in stage.submod.model.layers.children():  # the decoder blocks this stage owns, original names
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(stage.submod, mesh=mesh["dp"])  # the rest of the stage (embedding, norm, head) as one group
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-2)
    sched = SCHEDULES[args.schedule](stage, args.microbatches, loss_fn=lm_loss)
    first, last = stage.is_first, stage.is_last

    for step in range(args.steps):
        x, y = global_batch(step, args.dp * args.batch)
        t0 = time.perf_counter()
        opt.zero_grad()
        losses: list[torch.Tensor] = []
        sched.step(*((x.chunk(args.dp)[dp],) if first else ()), target=y.chunk(args.dp)[dp] if last else None,
                   losses=losses)
        pippy.clip_grad_norm_(sched, max_norm=1.0)
        opt.step()
        dt = time.perf_counter() - t0
        ref_opt.zero_grad()
        lm_loss(ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=1.0)
        ref_opt.step()
        if last and dp == 0:
            loss = float(torch.stack(losses).mean())
            print(f"step {step + 1:3d}/{args.steps}  loss {loss:.4f} (this DP rank's share)  step time "
                  f"{dt * 1e3:.0f} ms  [{args.schedule}, dp {args.dp} x pp {args.pp}, {args.microbatches} micro-batches]",
                  flush=True)

    err = 0.0
    with torch.no_grad():
        for name, p in stage.submod.named_parameters():
            err = max(err, float((p.full_tensor() - ref.get_parameter(name)).abs().max()))
    errs: list[float] = [0.0] * world
    dist.all_gather_object(errs, err)
    ok = max(errs) < 1e-10
    if dist.get_rank() == 0:
        print(f"check vs unpipelined model after {args.steps} AdamW steps: max parameter |diff| {max(errs):.2e} "
              f"over every rank -> {'OK' if ok else 'MISMATCH'}", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PIPPY_TIMEOUT", "120")
    sys.exit(main())

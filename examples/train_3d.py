"""3-D parallel training of a small Llama (from config, float64): data x pipeline x tensor parallel, checked against the plain model.

Run:  .venv/bin/torchrun --nproc-per-node 4 examples/train_3d.py --dp 2 --pp 2 [--steps 3] [--schedule 1f1b]
      .venv/bin/torchrun --nproc-per-node 4 examples/train_3d.py --pp 2 --tp 2
      .venv/bin/torchrun --nproc-per-node 8 examples/train_3d.py --dp 2 --pp 2 --tp 2
Across hosts (2 hosts x 2 processes, same command on each host):
      torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST0:29400 \\
          examples/train_3d.py --dp 2 --pp 2

The mesh is (dp, pp, tp). Every rank builds the same plain model and traces it on its own DP
share of the batch. It builds its pipeline stage and makes each decoder block of that stage
column/row parallel over its TP group (``parallelize_module``). Then it shards each block, and
the stage itself, over its DP group (``fully_shard``), and trains with AdamW. Each step prints a
progress line. At the end every parameter is gathered and compared with the same AdamW steps on
the unpipelined model over the global batch.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import parallelize_module
from transformers import LlamaConfig, LlamaForCausalLM

import pippy
from pippy import pipeline
from pippy.hf import split_spec_equal_layers

SCHEDULES = {"gpipe": pippy.ScheduleGPipe, "1f1b": pippy.Schedule1F1B}


def lm_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy (mean over tokens), in the model's dtype."""
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), target.reshape(-1))


lm_loss.reduction = "mean"  # type: ignore[attr-defined]  # tells pippy how it reduces


def make_model(layers: int, kv_heads: int = 2) -> LlamaForCausalLM:
    """A tiny Llama, float64, seeded: every rank builds the same weights."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).double()


def tp_plan() -> dict:
    """Megatron-style: q/k/v and gate/up split by output columns, o/down by input rows (one all-reduce each)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}


def global_batch(step: int, size: int, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic token batch and its next-token targets."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 128, (size, seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, default=None, help="default: the ranks left over by --pp x --tp")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="rows per DP rank")
    ap.add_argument("--schedule", choices=sorted(SCHEDULES), default="1f1b")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    if args.dp is None:
        args.dp = max(1, world // (args.pp * args.tp))
    if world != args.dp * args.pp * args.tp:
        raise SystemExit(f"--dp {args.dp} x --pp {args.pp} x --tp {args.tp} = {args.dp * args.pp * args.tp} ranks, "
                         f"but torchrun started {world}")
    mesh = init_device_mesh("cpu", (args.dp, args.pp, args.tp), mesh_dim_names=("dp", "pp", "tp"))
    dp, pp = mesh["dp"].get_local_rank(), mesh["pp"].get_local_rank()
    torch.set_num_threads(1)
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)  # 2-D gathers: a perf note

    # tensor parallelism shards the heads: Llama's reshapes infer them, but GQA's repeat_kv fixes the kv count
    model = make_model(layers=2 * args.pp, kv_heads=4 if args.tp > 1 else 2)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    x0, _ = global_batch(0, args.dp * args.batch)
    mine0 = x0.chunk(args.dp)[dp]
    pipe = pipeline(model, args.microbatches, (mine0,), split_spec=split_spec_equal_layers(model, args.pp))
    stage = pipe.build_stage(pp, "cpu", group=mesh)  # the mesh's "pp" dimension is the pipeline
    blocks = list(stage.submod.model.layers.children())  # the decoder blocks this stage owns, original names
    if args.tp > 1:
        for block in blocks:
            parallelize_module(block, mesh["tp"], tp_plan())
    if args.dp > 1:
        for block in blocks:
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
        if last and dp == 0 and mesh["tp"].get_local_rank() == 0:
            loss = float(torch.stack(losses).mean())
            print(f"step {step + 1:3d}/{args.steps}  loss {loss:.4f} (this DP rank's share)  step time "
                  f"{dt * 1e3:.0f} ms  [{args.schedule}, dp {args.dp} x pp {args.pp} x tp {args.tp}, {args.microbatches} micro-batches]",
                  flush=True)

    err = 0.0
    with torch.no_grad():
        for name, p in stage.submod.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            err = max(err, float((full - ref.get_parameter(name)).abs().max()))
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

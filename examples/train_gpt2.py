"""Pipelined training of a small GPT-2 (built from config, random init) on 2 CPU ranks, checked against the unpipelined model.

Run:  .venv/bin/torchrun --nproc-per-node 2 examples/train_gpt2.py [--steps 20] [--schedule 1f1b|gpipe|zb_h1]
(or simply `make demo`). Rank 0 holds the embeddings and the first half of the blocks; rank 1
the rest and the LM head, whose weight is tied to the embedding. Each step prints the loss and
the step time; at the end the pipelined loss and every gradient are compared with the plain model.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import pippy
from pippy import SplitPoint, pipeline


def lm_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy (mean over tokens)."""
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), target.reshape(-1))


lm_loss.reduction = "mean"  # type: ignore[attr-defined]  # tells pippy it averages (else it warns and assumes so)


def make_model(seed: int = 0) -> GPT2LMHeadModel:
    """A 4-layer, 128-wide GPT-2 without dropout."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=64, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def batch(step: int, bsz: int = 16, seq: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic next-token batch: a shifted repeating pattern the model can learn."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, 512, (bsz, 1), generator=g)
    toks = (start + torch.arange(seq + 1) * 7) % 512
    return toks[:, :-1].contiguous(), toks[:, 1:].contiguous()


SCHEDULES = {"1f1b": pippy.Schedule1F1B, "gpipe": pippy.ScheduleGPipe, "zb_h1": pippy.ScheduleZBH1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--schedule", choices=sorted(SCHEDULES), default="1f1b")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))

    model = make_model()
    x, y = batch(0)
    n_layer = model.config.n_layer
    cuts = {f"transformer.h.{(i + 1) * n_layer // world - 1}": SplitPoint.END for i in range(world - 1)}
    pipe = pipeline(model, args.microbatches, example_args=(x,), split_spec=cuts)
    if rank == 0:
        print(pipe, flush=True)
    stage = pipe.build_stage(rank, torch.device("cpu"))
    sched = SCHEDULES[args.schedule](stage, args.microbatches, loss_fn=lm_loss)
    opt = torch.optim.AdamW(stage.parameters(), lr=3e-3)
    first, last = rank == 0, rank == world - 1

    for step in range(args.steps):
        x, y = batch(step)
        opt.zero_grad()
        t0 = time.perf_counter()
        losses: list[torch.Tensor] = []
        sched.step(*((x,) if first else ()), target=y if last else None, losses=losses)
        opt.step()
        dt = time.perf_counter() - t0
        if last:
            print(f"step {step + 1:3d}/{args.steps}  loss {torch.stack(losses).mean().item():.4f}  "
                  f"step time {dt * 1000:.0f} ms  [{args.schedule}, {world} ranks, {args.microbatches} micro-batches]",
                  flush=True)

    # Check: gather the trained stages (original FQNs), load them into the plain model, and compare
    # one more step's loss and every gradient with the pipelined run on the same batch.
    shards: list[dict[str, torch.Tensor] | None] = [None] * world
    dist.all_gather_object(shards, {k: v.detach().clone() for k, v in stage.state_dict().items()})
    ref = make_model()
    full = {k: v for s in shards if s for k, v in s.items()}
    ref.load_state_dict(full, strict=True)
    x, y = batch(10_000)
    opt.zero_grad()
    losses = []
    sched.step(*((x,) if first else ()), target=y if last else None, losses=losses)
    ref_loss = lm_loss(ref(x), y)
    ref_loss.backward()
    ref_grads = dict(ref.named_parameters(remove_duplicate=False))
    worst = max(float((p.grad - ref_grads[n].grad).abs().max()) for n, p in stage.submod.named_parameters())
    worst_t = torch.tensor([worst])
    dist.all_reduce(worst_t, op=dist.ReduceOp.MAX)
    if last:
        loss_diff = abs(torch.stack(losses).mean().item() - ref_loss.item())
        ok = loss_diff < 1e-4 and worst_t.item() < 1e-4
        print(f"check vs unpipelined model: loss |diff| {loss_diff:.2e}, max grad |diff| {worst_t.item():.2e} "
              f"over {len(full)} tensors -> {'OK' if ok else 'MISMATCH'}", flush=True)
        if not ok:
            raise SystemExit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Pipelined greedy generation with a small GPT-2 (built from config, random init) on 2 CPU ranks, checked against HF.

Run:  .venv/bin/torchrun --nproc-per-node 2 examples/generate_gpt2.py [--groups 4] [--new 24] [--sample]

Rank 0 holds the embeddings and the first half of the blocks, rank 1 the rest, the final norm and
the LM head; each keeps the KV cache of its own blocks, and only hidden states (forward) and token
ids (back to rank 0) travel. The batch of left-padded prompts of different lengths is cut into
``--groups`` groups kept in flight at once. The last rank prints a progress line per 8 tokens;
every rank then compares its output with ``model.generate`` on the unpipelined model.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

import pippy


def make_model() -> GPT2LMHeadModel:
    """A 4-layer, 128-wide GPT-2 with random weights (the same on every rank)."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=128, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def make_prompts(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of lengths ``length``, ``length - 1``, ... and their attention mask."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(8, 512, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : row % length] = 0
    return ids.masked_fill(mask == 0, 0), mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=4, help="groups of prompts kept in flight at once")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new", type=int, default=24, help="max_new_tokens")
    parser.add_argument("--sample", action="store_true", help="sample (seed 0) instead of greedy decoding")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = make_model()  # the same weights on every rank (seeded); only this rank's stage runs here
    pipe = pippy.pipeline_for_generation(model, world, max_length=64)
    stage = pipe.build_stage(rank, "cpu")
    ids, mask = make_prompts(args.batch, 12)
    # random weights never say "end": take as EOS the 6th new token of rows 0 and 3, so that some rows stop early
    with torch.no_grad():
        torch.manual_seed(0)
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=args.sample, eos_token_id=None)
    eos = sorted({int(plain[0, -1]), int(plain[3, -1])})

    out = pippy.generate(stage, ids, attention_mask=mask, max_new_tokens=args.new, groups=args.groups,
                         do_sample=args.sample, seed=0, eos_token_id=eos)

    torch.manual_seed(0)  # model.generate samples from torch's default generator
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=args.new, do_sample=args.sample, eos_token_id=eos)
    same = torch.equal(out, ref)
    stopped = int(torch.isin(out[:, 12:], torch.tensor(eos)).any(dim=1).sum())
    print(f"rank {rank}: {stage}, output {tuple(out.shape)}, {stopped} rows stopped at EOS, "
          f"equal to model.generate on the unpipelined model: {same}", flush=True)
    if rank == world - 1:
        print(f"rank {rank}: first row's new tokens {out[0, 12:].tolist()}", flush=True)
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("PIPPY_TIMEOUT", "60")
    main()

"""Tokens/s of pipelined generation on 2 ranks: groups in flight vs none, and vs single-process ``model.generate``.

Run:  .venv/bin/torchrun --nproc-per-node 2 benchmarks/generate.py [--groups 2] [--batch 128] [--new 24] [--reps 3]

The defaults (8 layers x 512, batch 128) keep decode compute-bound: with small widths or groups
of a few rows, per-call Python overhead dominates and splitting the batch into groups costs what
overlapping them wins.

A Llama-style model built from config (random weights, float32, no EOS so every row makes
``--new`` tokens) is cut into 2 stages, one per rank, one torch thread per rank. Three sides, run
in turn ``--reps`` times after a warm-up (median wall time each):

- pipelined, the batch in ``--groups`` groups kept in flight at once (every stage busy);
- the same pipeline and groups with ``in_flight=1``: one group in the pipeline at a time (each
  stage idles while another works), the same work otherwise;
- the same pipeline with ``groups=1`` (the whole batch as one group: larger matrix products, but
  again each stage idles while another works);
- ``model.generate`` on the unpipelined model in one process with the same total threads (2),
  while the other rank waits; and, as intra-op threads can cost more than they give on a small
  or shared machine, the same with one thread.

Rank 0 prints tokens/s (batch x new tokens / wall time) of each side and the ratios. The
pipelined outputs are checked against ``model.generate`` (greedy) before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import pippy


def make_model(layers: int, hidden: int) -> LlamaForCausalLM:
    """A Llama-style decoder with random weights (seeded: the same on every rank) and no EOS."""
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=4096,
                      max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def timed(fn: Callable[[], object]) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=24)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--split", default="", help="decoder layers per stage, e.g. 5,3 (default: even)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    model = make_model(args.layers, args.hidden)
    split = [int(k) for k in args.split.split(",")] if args.split else None
    pipe = pippy.pipeline_for_generation(model, world, max_length=args.prompt + args.new, layers_per_stage=split)
    stage = pipe.build_stage(rank, "cpu")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4096, (args.batch, args.prompt), generator=g)
    mask = torch.ones_like(ids)
    for row in range(args.batch):
        mask[row, : row % 4] = 0  # prompts of different lengths, left-padded

    def piped(groups: int, in_flight: int | None = None) -> torch.Tensor:
        return pippy.generate(stage, ids, attention_mask=mask, max_new_tokens=args.new, groups=groups,
                              in_flight=in_flight, progress=0)

    def single(threads: int) -> None:
        if rank == 0:  # one process; the other ranks wait at the barrier
            torch.set_num_threads(threads)
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False)
            torch.set_num_threads(1)

    ref = model.generate(ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False)  # warm-up + check
    same = all(torch.equal(out, ref) for out in (piped(args.groups), piped(args.groups, 1), piped(1)))
    sides: dict[str, list[float]] = {"groups": [], "serial": [], "one": [], "single": [], "single1": []}
    for _ in range(args.reps):
        sides["groups"].append(timed(lambda: piped(args.groups)))
        sides["serial"].append(timed(lambda: piped(args.groups, 1)))
        sides["one"].append(timed(lambda: piped(1)))
        sides["single"].append(timed(lambda: single(world)))
        sides["single1"].append(timed(lambda: single(1)))
    if rank == 0:
        tokens = args.batch * args.new
        rate = {k: tokens / statistics.median(v) for k, v in sides.items()}
        lo, hi = pipe.plan.layers[0], pipe.plan.layers[-1]
        print(f"model: Llama {args.layers} layers x {args.hidden}, vocab 4096, float32; stages {lo} {hi}; batch "
              f"{args.batch}, prompt {args.prompt}, {args.new} new tokens; {args.reps} reps (median)")
        g = args.groups
        print(f"pipelined, groups={g}, all in flight     ({world} ranks x 1 thread): {rate['groups']:8.1f} tokens/s")
        print(f"pipelined, groups={g}, one in flight     ({world} ranks x 1 thread): {rate['serial']:8.1f} tokens/s")
        print(f"pipelined, groups=1                   ({world} ranks x 1 thread): {rate['one']:8.1f} tokens/s")
        print(f"model.generate, one process           ({world} threads):          {rate['single']:8.1f} tokens/s")
        print(f"model.generate, one process           (1 thread):           {rate['single1']:8.1f} tokens/s")
        print(f"in flight / one in flight: {rate['groups'] / rate['serial']:.2f}x; in flight / groups=1: "
              f"{rate['groups'] / rate['one']:.2f}x; in flight / model.generate: {rate['groups'] / rate['single']:.2f}x ({world} threads), "
              f"{rate['groups'] / rate['single1']:.2f}x (1 thread); "
              f"outputs equal model.generate: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

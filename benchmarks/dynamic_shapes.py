"""What variable shapes cost: a static pipe vs the same model traced with ``dynamic_shapes``, alternating steps.

Run:  .venv/bin/torchrun --nproc-per-node 2 benchmarks/dynamic_shapes.py [--steps 16] [--layers 4] [--width 256]

GPT-2 (4 layers, width 256, seq 128, batch 16, 4 micro-batches, 1F1B on 2 ranks, one thread per
rank). Part 1 runs both pipes on the same shape, step by step in turn, and prints the median step
time of each and the median of the paired ratios dynamic/static (with quartiles): what a pipe that
may vary pays when it does not. Part 2 steps the dynamic pipe through other sequence lengths and
prints each step's time next to what a static pipe would first spend tracing that length.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import transformers as tf

from pippy import Schedule1F1B, SplitPoint, pipeline
from pippy.runtime.shapes import needs_incoming


def _loss(out: object, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out["logits"].flatten(0, 1), y.flatten())  # type: ignore[index]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64), vocab_size=512,
                        n_positions=1024)
    model = tf.GPT2LMHeadModel(cfg).eval()
    spec = {f"transformer.h.{args.layers // world * (i + 1) - 1}": SplitPoint.END for i in range(world - 1)}
    g = torch.Generator().manual_seed(1)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, 512, (args.batch, n), generator=g), torch.randint(0, 512, (args.batch, n), generator=g)

    x, y = batch(args.seq)
    t0 = time.perf_counter()
    static = pipeline(model, 4, (), {"input_ids": x}, split_spec=spec)
    t_trace_static = time.perf_counter() - t0
    t0 = time.perf_counter()
    dynamic = pipeline(model, 4, (), {"input_ids": x}, split_spec=spec, dynamic_shapes="auto")
    t_trace_dyn = time.perf_counter() - t0
    scheds = {name: Schedule1F1B(pipe.build_stage(rank, "cpu"), 4, loss_fn=_loss, loss_reduction="mean")
              for name, pipe in (("static", static), ("dynamic", dynamic))}

    def step(name: str, xs: torch.Tensor, ys: torch.Tensor) -> float:
        dist.barrier()
        t = time.perf_counter()
        scheds[name].step(input_ids=xs, target=ys) if rank == 0 else scheds[name].step(target=ys)
        return time.perf_counter() - t

    for name in scheds:  # warm up
        step(name, x, y)
    times: dict[str, list[float]] = {"static": [], "dynamic": []}
    for k in range(args.steps):
        order = ("static", "dynamic") if k % 2 == 0 else ("dynamic", "static")
        for name in order:
            times[name].append(step(name, x, y))
    varying = [(n, step("dynamic", *batch(n))) for n in (96, 64, 17, 200, args.seq)]
    headers = sum(needs_incoming(m) for info in dynamic.stage_infos for m in info.input_meta if info.index > 0)
    if rank == 0:
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        ratios = sorted(d / s for d, s in zip(times["dynamic"], times["static"]))
        q = statistics.quantiles(ratios, n=4)
        print(f"GPT-2 {args.layers}x{args.width}, batch {args.batch}, seq {args.seq}, 4 micro-batches, 1F1B on {world} "
              f"ranks, {args.steps} paired steps")
        print(f"  static pipe : {med['static']:8.1f} ms/step   (trace {t_trace_static:.2f} s)")
        print(f"  dynamic pipe: {med['dynamic']:8.1f} ms/step   (trace {t_trace_dyn:.2f} s, {headers} edge(s) with a "
              "shape header)")
        print(f"  paired ratio dynamic/static: {statistics.median(ratios):.3f} [{q[0]:.3f}, {q[2]:.3f}]")
        print("  other lengths on the dynamic pipe (no retrace); a static pipe would first trace again:")
        for n, t in varying:
            print(f"    seq {n:4d}: {t * 1e3:8.1f} ms/step   vs a new static trace ~{t_trace_static:.2f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""A synthesized schedule vs the fixed ones, measured: GPT-2 on 2 ranks, 4 stages, the same step in turn.

Run:  .venv/bin/torchrun --nproc-per-node 2 benchmarks/synthesize.py [--steps 10] [--microbatches 8] [--like zbv]

The GPT-2 workload of ``benchmarks/vs_torch_pipelining.py`` (4 layers, width 256, seq 128, batch
16) cut into 4 stages, 2 per rank. Rank 0 profiles the stages (``pippy.profile``) and both ranks
use those costs. ``pippy.synthesize`` builds a schedule for them (V or interleaved placement)
within the predicted peak memory of the fixed schedule ``--like`` (``none``: no limit); every
fixed two-stages-per-rank schedule within that memory runs beside it, step after step in turn
(one thread per rank). Rank 0 prints,
per schedule, the predicted and the measured median step time and the predicted peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

import pippy
from pippy import pipeline
from pippy.schedules.lower import runtime_form
from pippy.sim.simulate import simulate

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from vs_torch_pipelining import gpt2_workload

FIXED = {"interleaved_1f1b": pippy.ScheduleInterleaved1F1B, "looped_bfs": pippy.ScheduleLoopedBFS,
         "interleaved_zb": pippy.ScheduleZBH1, "zbv": pippy.ScheduleZBV, "dualpipev": pippy.ScheduleDualPipeV}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--like", default="zbv", help="memory limit: this fixed schedule's predicted peak (none: no limit)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, args, y, loss, spec, _ = gpt2_workload(2 * world)
    m = a.microbatches
    pipe = pipeline(model, m, args, split_spec=spec)
    box: list[Any] = [None]
    if rank == 0:
        box[0] = pippy.profile(pipe, args, loss_fn=loss, target=y, repeats=5)
        box[0].latency = 2e-4
    dist.broadcast_object_list(box, src=0)
    costs = box[0]
    rows: dict[str, tuple[Any, float, float]] = {}  # name -> (schedule object, predicted step, predicted peak)
    for name, cls in FIXED.items():
        placement = cls.placement(world, 2)
        mine = [pipe.build_stage(s, "cpu") for s in range(pipe.num_stages) if placement[s] == rank]
        try:
            sched = cls(mine, m, loss_fn=loss, loss_reduction="mean")
        except ValueError:
            continue  # e.g. DualPipeV needs m >= 2p-1
        assert sched.schedule is not None
        res = simulate(runtime_form(sched.schedule.compute_only(), ()), costs)
        rows[name] = (sched, res.step_time, max(res.peak_memory))
    limit = rows[a.like][2] if a.like in rows else None
    syn = pippy.synthesize(world, m, costs, memory_limit=limit)
    rows = {k: v for k, v in rows.items() if limit is None or v[2] <= limit * 1.0001}
    placement = syn.schedule.stage_to_rank
    mine = [pipe.build_stage(s, "cpu") for s in range(pipe.num_stages) if placement[s] == rank]

    class _Here(pippy.ScheduleSynthesized):
        @classmethod
        def placement(cls, num_ranks: int, stages_per_rank: int = 2) -> tuple[int, ...]:
            return placement

    synth = _Here(mine, m, loss_fn=loss, loss_reduction="mean", costs=costs)
    rows["synthesized"] = (synth, syn.step_time, syn.peak_memory)
    times: dict[str, list[float]] = {k: [] for k in rows}
    x = args[0]
    for k in range(a.steps + 1):
        names = list(rows) if k % 2 == 0 else list(reversed(rows))
        for name in names:
            sched = rows[name][0]
            first = sched.schedule.stage_to_rank[0] == rank
            last = sched.schedule.stage_to_rank[-1] == rank
            dist.barrier()
            t = time.perf_counter()
            sched.step(*((x,) if first else ()), target=y if last else None)
            if k:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    if rank == 0:
        print(f"GPT-2 4x256, seq 128, batch 16, {m} micro-batches, 4 stages on {world} ranks; {a.steps} steps each")
        lim = "none" if limit is None else f"{limit / 2**20:.1f} MiB ({a.like}'s predicted peak)"
        print(f"memory limit {lim}; synthesized: {syn.rule}; best fixed in simulation: {syn.best_fixed} "
              f"{syn.best_fixed_time * 1e3:.1f} ms")
        print(f"{'schedule':<18} {'predicted':>10} {'measured':>10} {'peak (pred.)':>13}")
        for name, (_, pred, peak) in sorted(rows.items(), key=lambda kv: statistics.median(times[kv[0]])):
            print(f"{name:<18} {pred * 1e3:>8.1f}ms {statistics.median(times[name]) * 1e3:>8.1f}ms "
                  f"{peak / 2**20:>10.1f}MiB")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

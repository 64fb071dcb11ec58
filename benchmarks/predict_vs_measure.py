"""Simulator vs reality: profile the stages, predict a step, run it traced, and print both side by side.

Run:  .venv/bin/torchrun --nproc-per-node 2 benchmarks/predict_vs_measure.py [--steps 10] [--warmup 2]
      [--workloads mlp,gpt2] [--schedules gpipe,1f1b,zb_h1] [--repeats 10]

The workloads are those of ``benchmarks/vs_torch_pipelining.py`` (imported from it): an MLP stack
(8 residual blocks Linear(512, 2048)-ReLU-Linear(2048, 512), batch 64, 8 micro-batches) and
GPT-2 from config (4 layers, width 256, sequence 128, batch 16, 4 micro-batches), each split in
the middle over 2 ranks with one thread per rank. For each workload and schedule:

1. the schedule runs ``--warmup`` + ``--steps`` traced steps (``trace=True``); the measured step
   is the traced step with the median step time (first action start to last action end);
2. before the first measured step and after each one, ``pippy.sim.profile.profile_ranks``
   times every stage on its own rank (both ranks at once, as in the run; plain F and one-pass B,
   tapped F, I and W, through the runtime's PipelineStage; ``--repeats`` runs) and measures the
   gloo link by ping-pong;
3. ``pippy.sim.simulate`` predicts the step of the very schedule object the runtime executes:
   each measured step from the two profile rounds that bracket it (``median_costs``), since
   this shared machine's speed drifts by tens of percent within a minute; the paired errors'
   median is the ``paired`` column. The ``predicted`` column simulates the median of all rounds
   and compares with the median measured step;
4. rank 0 prints ``predict_vs_measure`` (step time, bubble per rank, per-action medians).

The runtime runs with its defaults, so split-backward schedules also fill bubbles at run time
(a rank about to wait runs a later W); the simulator models the static order only, which makes
its ZB prediction a little pessimistic.

No fudge factors: the prediction uses only the profile. The ``calibrated`` columns predict each
step from the durations the previous traced step measured (``pippy.sim.calibrate``): the
contention of the real run (two ranks on two shared cores, the machine's drift) is in them, which
a profile of each stage alone cannot see, and so is the latency its messages took (sender's post
to the end of a receiver's wait), which an idle ping-pong does not see, and the runtime's own time
per compute action (posting sends and receives, bookkeeping: ``traced_overhead``), which a profile
of the stages cannot see at all. Not a test: it asserts
nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_torch_pipelining import gpt2_workload, mlp_workload  # the same workloads

import pippy
from pippy import pipeline
from pippy.sim.calibrate import calibrate, traced_latency, traced_overhead
from pippy.sim.compare import predict_vs_measure
from pippy.sim.profile import median_costs, profile_ranks
from pippy.sim.render import format_time
from pippy.sim.simulate import simulate
from pippy.sim.timeline import Timeline

WORKLOADS = {"mlp": mlp_workload, "gpt2": gpt2_workload}
SCHEDULES: dict[str, Any] = {"gpipe": pippy.ScheduleGPipe, "1f1b": pippy.Schedule1F1B, "zb_h1": pippy.ScheduleZBH1}


def run_one(workload: str, sched_name: str, a: argparse.Namespace, rank: int, world: int) -> dict[str, Any] | None:
    """Profile, predict and measure one (workload, schedule); rank 0 gets the figures."""
    cls = SCHEDULES[sched_name]
    model, args, target, loss_fn, spec, n_mb = WORKLOADS[workload](world)
    pipe = pipeline(model, n_mb, example_args=args, split_spec=spec)
    placement = cls.placement(world)
    stage = pipe.build_stage(rank, "cpu")
    sched = cls(stage, n_mb, loss_fn=loss_fn, trace=True)
    assert sched.schedule is not None
    first, last = rank == placement[0], rank == placement[-1]
    profiles = []
    timelines: list[Timeline] = []
    walls: list[float] = []

    def profile_round() -> None:
        profiles.append(profile_ranks(pipe, args, placement, loss_fn=loss_fn, target=target, threads=1,
                                      repeats=a.repeats, warmup=1))

    for k in range(a.warmup + a.steps):
        if k == a.warmup:
            profile_round()
        stage.submod.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = time.perf_counter()
        sched.step(*(args if first else ()), target=target if last else None)
        wall = time.perf_counter() - t0
        if k >= a.warmup and rank == 0:
            assert sched.last_timeline is not None
            timelines.append(sched.last_timeline)
            walls.append(wall)
        if k >= a.warmup:
            profile_round()
    if rank != 0:
        return None
    paired = [(simulate(sched.schedule, median_costs(profiles[k:k + 2])).step_time - t.step_time) / t.step_time
              for k, t in enumerate(timelines)]
    # calibrated: each step predicted from the costs the previous traced step measured (pippy.sim.calibrate)
    calibrated = [(simulate(sched.schedule, calibrate(median_costs(profiles[k:k + 2]), timelines[k - 1])).step_time
                   - t.step_time) / t.step_time for k, t in enumerate(timelines) if k > 0]
    traced = [x for t in timelines if (x := traced_latency(median_costs(profiles), t)) is not None]
    overheads = [x for t in timelines if (x := traced_overhead(t)) is not None]
    costs = median_costs(profiles)
    timelines.sort(key=lambda t: t.step_time)
    measured = timelines[len(timelines) // 2]
    pred = simulate(sched.schedule, costs)
    return {"paired": statistics.median(paired), "paired_max": max(paired, key=abs),
        "calibrated": statistics.median(calibrated) if calibrated else float("nan"),
        "calibrated_max": max(calibrated, key=abs) if calibrated else float("nan"),
        "workload": workload, "schedule": sched_name, "pred": pred.step_time, "meas": measured.step_time,
        "pred_bubble": pred.bubble, "meas_bubble": measured.bubbles(), "wall": statistics.median(walls),
        "spread": (timelines[0].step_time, timelines[-1].step_time), "latency": costs.latency,
        "traced_latency": statistics.median(traced) if traced else float("nan"),
        "overhead": statistics.median(overheads) if overheads else float("nan"),
        "bandwidth": costs.bandwidth, "table": predict_vs_measure(sched.schedule, costs, measured),
        "stages": [(c.f, c.b, c.forward_time(True), c.i, c.w) for c in costs.stages],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="measured steps after the warm-up (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--repeats", type=int, default=2, help="profile runs per stage after each step (default 2)")
    ap.add_argument("--workloads", default="mlp,gpt2")
    ap.add_argument("--schedules", default="gpipe,1f1b,zb_h1")
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    rows = []
    for w in a.workloads.split(","):
        for s in a.schedules.split(","):
            res = run_one(w, s, a, rank, world)
            if res is None:
                continue
            rows.append(res)
            lat, bw = res["latency"], res["bandwidth"]
            print(f"\n=== {w} / {s}: link latency {format_time(lat)} (ping-pong), {format_time(res['traced_latency'])} "
                  f"(traced step), bandwidth {bw / 1e9:.2f} GB/s; runtime overhead {format_time(res['overhead'])} per "
                  "compute action (traced step); per micro-batch "
                  + "; ".join(f"stage {i}: F {format_time(f)} B {format_time(b)} | tapped F {format_time(sf)} "
                              f"I {format_time(ii)} W {format_time(ww)}"
                              for i, (f, b, sf, ii, ww) in enumerate(res["stages"])), flush=True)
            lo, hi = res["spread"]
            print(f"measured over {a.steps} steps: min {format_time(lo)}, median {format_time(res['meas'])}, "
                  f"max {format_time(hi)}; median wall time of step() {format_time(res['wall'])}")
            print(res["table"], flush=True)
        dist.barrier()
    if rank == 0:
        print(f"\nsummary ({world} ranks, 1 thread each; bubble in % of the step, predicted/measured)")
        print("(paired: median over steps of the error of each step against the profile rounds around it; "
              "worst: the largest such error; calibrated: each step predicted from the costs the previous traced "
              "step measured (pippy.sim.calibrate), median and worst)")
        print(f"{'workload':<9} {'schedule':<7} {'predicted':>10} {'measured':>10} {'error':>7} {'paired':>7} "
              f"{'worst':>7} {'calibr.':>8} {'worst':>7}  bubble per rank")
        for r in rows:
            err = 100 * (r["pred"] - r["meas"]) / r["meas"]
            bub = "  ".join(f"r{i} {100 * p:4.1f}/{100 * m:4.1f}" for i, (p, m) in enumerate(zip(r["pred_bubble"], r["meas_bubble"])))
            print(f"{r['workload']:<9} {r['schedule']:<7} {format_time(r['pred']):>10} {format_time(r['meas']):>10} "
                  f"{err:+6.1f}% {100 * r['paired']:+6.1f}% {100 * r['paired_max']:+6.1f}% "
                  f"{100 * r['calibrated']:+7.1f}% {100 * r['calibrated_max']:+6.1f}%  {bub}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

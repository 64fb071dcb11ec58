"""pippy vs torch.distributed.pipelining: same model, same split, same batch, same schedule, alternating steps.

Run:  .venv/bin/torchrun --nproc-per-node 2 benchmarks/vs_torch_pipelining.py [--steps 12] [--workloads mlp,gpt2]
      [--schedules gpipe,1f1b,interleaved_1f1b,looped_bfs,zbv,dualpipev] [--recompute pointwise|full]
      [--memory pippy|peer]  (one side per run: peak RSS and peak live tensor bytes per rank)

Both runtimes execute the very same stage modules (pippy's traced and split GraphModules, deep
copied), so the comparison isolates the pipeline runtime: scheduling, communication, backward
splitting. Each rank uses one thread. Rank 0 prints the median step time of each side and the
ratio pippy/peer (below 1.0 means pippy is faster). Multi-stage schedules use 2 stages per rank.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import pipelining as peer

import pippy
from pippy import SplitPoint, pipeline


class Block(nn.Module):
    """Residual Linear(d, 4d) -> ReLU -> Linear(4d, d)."""

    def __init__(self, d: int = 512, h: int = 2048) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class MLP(nn.Module):
    """8 residual blocks."""

    def __init__(self, n: int = 8) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block() for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def mlp_workload(n_stages: int) -> tuple[nn.Module, tuple, torch.Tensor, Callable, dict, int]:
    """MLP stack, batch 64, 8 micro-batches."""
    torch.manual_seed(0)
    model = MLP()
    per = 8 // n_stages
    spec = {f"blocks.{per * (i + 1) - 1}": SplitPoint.END for i in range(n_stages - 1)}
    x, y = torch.randn(64, 512), torch.randn(64, 512)
    return model, (x,), y, F.mse_loss, spec, 8


TIED = True  # --untied: GPT-2 without the tied LM head (the peer never sums tied-weight grads; pippy does)
RECOMPUTE: bool | str = False  # --recompute: pippy's stages recompute ("pointwise" or "full"); the peer has no such option


def gpt2_workload(n_stages: int) -> tuple[nn.Module, tuple, torch.Tensor, Callable, dict, int]:
    """GPT-2 from config: 4 layers, width 256, sequence 128, batch 16, 4 micro-batches."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=2048, n_positions=128, use_cache=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     tie_word_embeddings=TIED)
    model = GPT2LMHeadModel(cfg)
    per = 4 // n_stages
    spec = {f"transformer.h.{per * (i + 1) - 1}": SplitPoint.END for i in range(n_stages - 1)}
    x, y = torch.randint(0, 2048, (16, 128)), torch.randint(0, 2048, (16, 128))

    def loss(out: Any, t: torch.Tensor) -> torch.Tensor:
        logits = out.logits if hasattr(out, "logits") else out
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1))

    return model, (x,), y, loss, spec, 4


WORKLOADS = {"mlp": mlp_workload, "gpt2": gpt2_workload}
# name -> (pippy class, peer class, stages per rank)
SCHEDULES: dict[str, tuple[Any, Any, int]] = {
    "gpipe": (pippy.ScheduleGPipe, peer.ScheduleGPipe, 1),
    "1f1b": (pippy.Schedule1F1B, peer.Schedule1F1B, 1),
    "interleaved_1f1b": (pippy.ScheduleInterleaved1F1B, peer.ScheduleInterleaved1F1B, 2),
    "looped_bfs": (pippy.ScheduleLoopedBFS, peer.ScheduleLoopedBFS, 2),
    "zbv": (pippy.ScheduleZBV, peer.ScheduleZBVZeroBubble, 2),
    "dualpipev": (pippy.ScheduleDualPipeV, peer.ScheduleDualPipeV, 2),
}


class _PeerWrap(nn.Module):
    """Peer stages pass tensors positionally and want a tensor (or tuple) back; unwrap 1-tuples."""

    def __init__(self, gm: nn.Module, last: bool, unflatten: Callable[[Any], Any]) -> None:
        super().__init__()
        self.gm, self.last, self.unflatten = gm, last, unflatten

    def forward(self, *xs: torch.Tensor) -> Any:
        out = self.gm(*xs)
        if self.last:
            res = self.unflatten(out)
            return res.logits if hasattr(res, "logits") else res
        return out[0] if len(out) == 1 else tuple(out)


def _setup(workload: str, sched: str, rank: int, world: int) -> tuple[Any, ...]:
    """The workload split for ``sched`` on ``world`` ranks: model, pipe, args, target, loss_fn, micro-batches,
    placement and this rank's stage indices."""
    ours_cls, _, spr = SCHEDULES[sched]
    n_stages = world * spr
    model, args, target, loss_fn, spec, n_mb = WORKLOADS[workload](n_stages)
    pipe = pipeline(model, n_mb, example_args=args, split_spec=spec)
    placement = ours_cls.placement(world, spr)
    return model, pipe, args, target, loss_fn, n_mb, placement, [s for s in range(n_stages) if placement[s] == rank]


def _peer_stages(pipe: Any, mine: list[int]) -> list[Any]:
    """The peer's stages for this rank: deep copies of pippy's stage modules (the very same computation)."""
    n = pipe.num_stages
    return [peer.PipelineStage(_PeerWrap(copy.deepcopy(pipe.get_stage_module(s)), s == n - 1, pipe.unflatten_output),
                               s, n, torch.device("cpu")) for s in mine]


def _rss_now() -> float:
    """Resident set size of this process now, bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> float:
    """Peak resident set size of this process so far, bytes."""
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _live_added(events: Any, start_ns: int) -> float:
    """Peak live tensor bytes after ``start_ns`` minus those live at ``start_ns``: the running sum of the CPU
    allocator's alloc/free records in a profile that began before anything measured was allocated."""
    cur = base = peak = 0
    for t, n in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        cur += n
        if t < start_ns:
            base = peak = cur
        else:
            peak = max(peak, cur)
    return float(peak - base)


def memory(workload: str, sched: str, steps: int, rank: int, world: int, side: str) -> tuple[float, float, float]:
    """Run one side only (this process never builds the other): (peak RSS, peak RSS minus RSS before the
    steps, peak live tensor bytes the steps add).

    The RSS difference is what the steps themselves add (activations, messages, gradients) over the
    model, the stage modules and torch, which both sides share; run each side in its own torchrun.
    Then a second runner of the same side, built under ``torch.profiler`` with ``profile_memory``,
    runs the same steps: the CPU allocator's own alloc/free records give the highest sum of tensor
    bytes live during the steps minus those live when they began (malloc's caching, fragmentation
    and the profiler's own memory do not enter it; buffers a runtime keeps between steps do).
    """
    ours_cls, peer_cls, spr = SCHEDULES[sched]
    model, pipe, args, target, loss_fn, n_mb, placement, mine = _setup(workload, sched, rank, world)

    def build() -> tuple[list[Any], Any]:
        if side == "pippy":
            stages: list[Any] = [pipe.build_stage(s, "cpu", recompute=RECOMPUTE) for s in mine]
            return stages, ours_cls(stages[0] if spr == 1 else stages, n_mb, loss_fn=loss_fn, loss_reduction="mean")
        stages = _peer_stages(pipe, mine)
        return stages, peer_cls(stages[0] if spr == 1 else stages, n_mb, loss_fn=loss_fn)

    first, last = placement[0] == rank, placement[-1] == rank

    def run(stages: list[Any], runner: Any) -> None:
        for _ in range(steps):
            for st in stages:
                st.submod.zero_grad()
            runner.step(*(args if first else ()), target=target if last else None)

    stages, runner = build()
    del model
    gc.collect()
    before = _rss_now()
    run(stages, runner)
    rss_peak, rss_added = _rss_peak(), _rss_peak() - before
    del stages, runner
    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        stages, runner = build()
        dist.barrier()
        with torch.profiler.record_function("measured steps"):
            run(stages, runner)
    mark = next(e.start_ns() for e in prof.profiler.kineto_results.events() if e.name() == "measured steps")
    return rss_peak, rss_added, _live_added(prof.profiler.kineto_results.events(), mark)


def bench(workload: str, sched: str, steps: int, rank: int, world: int) -> tuple[float, float, list[float]] | None:
    """Median step seconds (pippy, peer) for one workload and schedule, and the paired ratios.

    Step ``i`` runs both sides back to back (the order alternates), so ``t_ours[i] / t_theirs[i]``
    compares them under the same machine conditions; this shared machine drifts by tens of
    percent within a minute, which a ratio of medians over the whole run does not cancel.
    """
    ours_cls, peer_cls, spr = SCHEDULES[sched]
    _, pipe, args, target, loss_fn, n_mb, placement, mine = _setup(workload, sched, rank, world)
    ours_stages = [pipe.build_stage(s, "cpu", recompute=RECOMPUTE) for s in mine]
    ours = ours_cls(ours_stages[0] if spr == 1 else ours_stages, n_mb, loss_fn=loss_fn, loss_reduction="mean")

    def peer_loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loss_fn(out, t)

    peer_stages = _peer_stages(pipe, mine)  # the peer infers shapes by a metadata exchange on first use
    theirs = peer_cls(peer_stages[0] if spr == 1 else peer_stages, n_mb, loss_fn=peer_loss)
    first, last = placement[0] == rank, placement[-1] == rank

    def run_ours() -> None:
        for st in ours_stages:
            st.submod.zero_grad()
        ours.step(*(args if first else ()), target=target if last else None)

    def run_theirs() -> None:
        for st in peer_stages:
            st.submod.zero_grad()
        theirs.step(*(args if first else ()), target=target if last else None)

    t_ours, t_theirs = [], []
    for i in range(steps + 2):
        for fn, acc in ((run_ours, t_ours), (run_theirs, t_theirs)) if i % 2 == 0 else ((run_theirs, t_theirs), (run_ours, t_ours)):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            if i >= 2:  # warm-up
                acc.append(time.perf_counter() - t0)
    return statistics.median(t_ours), statistics.median(t_theirs), [a / b for a, b in zip(t_ours, t_theirs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--workloads", default="mlp,gpt2")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--untied", action="store_true", help="GPT-2 without tied embeddings (see TIED)")
    ap.add_argument("--recompute", choices=["pointwise", "full"], help="pippy's stages recompute activations")
    ap.add_argument("--memory", choices=["pippy", "peer"],
                    help="run only this side and print each rank's peak RSS (run once per side, separate processes)")
    a = ap.parse_args()
    global TIED, RECOMPUTE
    TIED = not a.untied
    RECOMPUTE = a.recompute or False
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    if a.memory:
        for w in a.workloads.split(","):
            for s in a.schedules.split(","):
                got: list[Any] = [None] * world
                dist.all_gather_object(got, memory(w, s, a.steps, rank, world, a.memory))
                if rank == 0:
                    print(f"memory {a.memory:5s} {w:5s} {s:17s} peak RSS MiB per rank "
                          f"[{', '.join(f'{g[0] / 2**20:.1f}' for g in got)}]  added by the steps MiB per rank "
                          f"[{', '.join(f'{g[1] / 2**20:.1f}' for g in got)}]  peak live tensors MiB per rank "
                          f"[{', '.join(f'{g[2] / 2**20:.1f}' for g in got)}]", flush=True)
        dist.destroy_process_group()
        return
    rows = []
    for w in a.workloads.split(","):
        for s in a.schedules.split(","):
            try:
                res = bench(w, s, a.steps, rank, world)
            except Exception as exc:  # report on every rank; the other ranks' waits then fail or time out
                print(f"rank {rank}: {w:5s} {s:17s} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                      flush=True)
                raise
            if rank == 0 and res is not None:
                ours, theirs, ratios = res
                q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
                rows.append((w, s, ours, theirs, med, q1, q3))
                print(f"{w:5s} {s:17s} pippy {ours * 1e3:8.1f} ms   torch.distributed.pipelining {theirs * 1e3:8.1f} ms   "
                      f"ratio {ours / theirs:5.2f}   paired {med:5.2f} [{q1:.2f}, {q3:.2f}]", flush=True)
    if rank == 0:
        print("\nratio: median pippy / median peer; paired: median of per-step ratios [quartiles] (<1: pippy faster)")
        print("workload schedule           pippy ms   peer ms   ratio   paired  quartiles")
        for w, s, o, t, med, q1, q3 in rows:
            print(f"{w:8s} {s:17s} {o * 1e3:9.1f} {t * 1e3:9.1f}   {o / t:5.2f}   {med:5.2f}  [{q1:.2f}, {q3:.2f}]")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

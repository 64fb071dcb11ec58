"""The checks of ``benchmarks/gpu_check.sh``: transparency on a device, a real multi-rank run, pippy vs the peer.

Subcommands (``--device cuda`` or ``cpu``; ``gpu_check.sh --cpu`` runs all three small on CPU):

- ``transparency``: in one process, every schedule with all stages on the device (2 ranks driven
  in-process, 2 or 4 stages), float64 GPT-2 from config and an MLP; outputs and every gradient
  against the plain model on the same device.
- ``dist`` (under torchrun, one rank per device; gloo on CPU): 1F1B and ZB-V over the real
  backend, float64, gradients against the plain model.
- ``bench`` (under torchrun): GPT-2 from config, pippy and ``torch.distributed.pipelining`` on the
  same stage modules, step in turn: step time, tokens/s and peak memory per rank
  (``torch.cuda.max_memory_allocated``; peak RSS on CPU), host synchronisations per step counted
  with the profiler (see :func:`count_syncs`), and how much of the send/receive kernel time overlaps
  compute (CUDA, 2+ ranks). One rank (one GPU) runs 2 stages with interleaved 1F1B on both sides.
  Micro-batches: at least 4 and at least the number of stages (torch's 1F1B needs as many), the
  batch raised to a multiple of them if needed (see :func:`micro_batches`).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pippy
from pippy import SplitPoint, pipeline
from pippy.runtime.local import LocalPipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_torch_pipelining import _PeerWrap, _rss_peak

ONE_PER_RANK = ["ScheduleGPipe", "Schedule1F1B", "ScheduleZBH1", "ScheduleZBH2"]
TWO_PER_RANK = ["ScheduleInterleaved1F1B", "ScheduleLoopedBFS", "ScheduleZBH1", "ScheduleZBV", "ScheduleDualPipeV"]
# one host sync is one of these CUDA runtime calls (.item() on CUDA: aten::item -> aten::_local_scalar_dense ->
# cudaStreamSynchronize, counted once, as the runtime call); on CPU, where nothing syncs, the op a sync runs on CUDA
CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
CPU_SYNC = "aten::_local_scalar_dense"  # .item(), float(t), bool(t), int(t): one each


def gpt2(layers: int, width: int, seq: int, tied: bool = True) -> nn.Module:
    """GPT-2 from config with random weights, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64), vocab_size=2048, n_positions=seq,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0,
                     eos_token_id=0, tie_word_embeddings=tied)
    return GPT2LMHeadModel(cfg)


def lm_loss(out: Any, t: torch.Tensor) -> torch.Tensor:
    logits = out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1))


def _spec(prefix: str, n_layers: int, n_stages: int) -> dict[str, SplitPoint]:
    per = n_layers // n_stages
    return {f"{prefix}.{per * (i + 1) - 1}": SplitPoint.END for i in range(n_stages - 1)}


def transparency(dev: torch.device) -> bool:
    """Every schedule, in one process, all stages on ``dev``; prints a PASS/FAIL line each."""
    ok = True
    for n_stages, names in ((2, ONE_PER_RANK), (4, TWO_PER_RANK)):
        model = gpt2(4, 32, 16).double().to(dev)
        x = torch.randint(0, 2048, (8, 16), device=dev)
        y = torch.randint(0, 2048, (8, 16), device=dev)
        pipe = pipeline(model, 4, (x,), split_spec=_spec("transformer.h", 4, n_stages))
        ref = copy.deepcopy(model)
        lm_loss(ref(x), y).backward()
        for name in names:
            lp = LocalPipeline(pipe, getattr(pippy, name), num_ranks=2, n_microbatches=4, loss_fn=lm_loss,
                               loss_reduction="mean", device=dev)
            out = lp.step(x, target=y)
            d_out = (out["logits"] - ref(x).logits).abs().max().item()
            grads = lp.named_grads()
            d_grad = max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters() if n in grads)
            good = d_out < 1e-10 and d_grad < 1e-10 and all(t.device.type == dev.type for t in grads.values()
                                                             if t is not None)
            ok &= good
            print(f"transparency {name:<24} {n_stages} stages on {dev}: max |d out| {d_out:.1e}, max |d grad| "
                  f"{d_grad:.1e}: {'PASS' if good else 'FAIL'}", flush=True)
    return ok


def _init(dev_kind: str) -> tuple[int, int, torch.device]:
    backend = "nccl" if dev_kind == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if dev_kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(1)
    return rank, world, torch.device("cpu")


def dist_check(dev_kind: str) -> bool:
    """1F1B and ZB-V over the real backend (float64); each rank prints its PASS/FAIL line."""
    rank, world, dev = _init(dev_kind)
    ok = True
    for name, spr in (("Schedule1F1B", 1), ("ScheduleZBV", 2)):
        cls = getattr(pippy, name)
        n_stages = world * spr
        model = gpt2(2 * n_stages, 32, 16).double().to(dev)
        x = torch.randint(0, 2048, (8, 16), device=dev)
        y = torch.randint(0, 2048, (8, 16), device=dev)
        pipe = pipeline(model, 4, (x,), split_spec=_spec("transformer.h", 2 * n_stages, n_stages))
        placement = cls.placement(world, spr)
        mine = [pipe.build_stage(s, dev) for s in range(n_stages) if placement[s] == rank]
        sched = cls(mine[0] if spr == 1 else mine, 4, loss_fn=lm_loss, loss_reduction="mean")
        sched.step(*((x,) if placement[0] == rank else ()), target=y if placement[-1] == rank else None)
        ref = copy.deepcopy(model)
        lm_loss(ref(x), y).backward()
        d = max((p.grad - ref.get_parameter(n).grad).abs().max().item()
                for st in mine for n, p in st.unwrapped.named_parameters() if p.grad is not None)
        good = d < 1e-10
        ok &= good
        print(f"dist {name:<14} rank {rank} of {world} on {dev} ({dist.get_backend()}): max |d grad| {d:.1e}: "
              f"{'PASS' if good else 'FAIL'}", flush=True)
    dist.destroy_process_group()
    return ok


def _peak_bytes(dev: torch.device) -> float:
    return float(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else _rss_peak()  # CPU: whole process


def count_syncs(names: list[str], cuda: bool, own: int = 0) -> Counter[str]:
    """Host synchronisations among profiler event ``names``, each counted once, less ``own`` (the harness's).

    On CUDA only the runtime's synchronize calls count (one per sync, whatever op made it; the
    harness's own ``torch.cuda.synchronize`` is one ``cudaDeviceSynchronize``, taken off via
    ``own``); on CPU the scalar reads that would sync on CUDA (``aten::_local_scalar_dense``).

        >>> count_syncs(["aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize",
        ...              "cudaDeviceSynchronize"], cuda=True, own=1)
        Counter({'cudaStreamSynchronize': 1})
        >>> count_syncs(["aten::item", "aten::_local_scalar_dense"], cuda=False)
        Counter({'aten::_local_scalar_dense': 1})
    """
    counts: Counter[str] = Counter(n for n in names if (n in CUDA_SYNCS if cuda else n == CPU_SYNC))
    counts["cudaDeviceSynchronize"] -= own
    return +counts  # drops what the harness's own calls brought to zero


def _syncs(dev: torch.device, fn: Any) -> tuple[Counter[str], float]:
    """Host synchronisations of one ``fn()`` (see :func:`count_syncs`) and the overlapped share of comm kernels.

    ``fn`` must not synchronize itself; the one ``torch.cuda.synchronize`` here (so every kernel is
    in the profile) is not counted.
    """
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    events = list(prof.events())
    counts = count_syncs([ev.name for ev in events], dev.type == "cuda", own=1 if dev.type == "cuda" else 0)
    comm: list[tuple[float, float]] = []
    compute: list[tuple[float, float]] = []
    for ev in events:
        if getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA:
            span = (ev.time_range.start, ev.time_range.end)
            (comm if "nccl" in ev.name.lower() else compute).append(span)
    total = sum(b - a for a, b in comm)
    covered = sum(max(0.0, min(b, d) - max(a, c)) for a, b in comm for c, d in compute)
    return counts, (covered / total if total else float("nan"))


def micro_batches(n_stages: int, batch: int) -> tuple[int, int]:
    """(micro-batches, batch): at least 4 and at least ``n_stages`` micro-batches (torch's 1F1B needs as many as
    stages), and ``batch`` raised to the next multiple of them if it is not one.

        >>> micro_batches(2, 8), micro_batches(8, 8), micro_batches(6, 8)
        ((4, 8), (8, 8), (6, 12))
    """
    m = max(4, n_stages)
    return m, -(-max(batch, m) // m) * m


def bench(dev_kind: str, layers: int, width: int, seq: int, batch: int, steps: int) -> None:
    """pippy vs torch.distributed.pipelining on GPT-2, the same stage modules; rank 0 prints both sides."""
    from torch.distributed import pipelining as peer

    rank, world, dev = _init(dev_kind)
    spr = 2 if world == 1 else 1
    ours_cls, peer_cls = ((pippy.ScheduleInterleaved1F1B, peer.ScheduleInterleaved1F1B) if spr == 2
                          else (pippy.Schedule1F1B, peer.Schedule1F1B))
    n_stages = world * spr
    m, fitted = micro_batches(n_stages, batch)
    if rank == 0 and fitted != batch:
        print(f"bench: batch {batch} raised to {fitted} ({m} micro-batches for {n_stages} stages)", flush=True)
    batch = fitted
    model = gpt2(layers, width, seq).to(dev)
    torch.manual_seed(1)
    x = torch.randint(0, 2048, (batch, seq), device=dev)
    y = torch.randint(0, 2048, (batch, seq), device=dev)
    pipe = pipeline(model, m, (x,), split_spec=_spec("transformer.h", layers, n_stages))
    placement = ours_cls.placement(world, spr)
    mine = [s for s in range(n_stages) if placement[s] == rank]
    ours_stages = [pipe.build_stage(s, dev) for s in mine]
    ours = ours_cls(ours_stages[0] if spr == 1 else ours_stages, m, loss_fn=lm_loss, loss_reduction="mean")
    peer_stages = []
    for s in mine:
        gm = copy.deepcopy(pipe.get_stage_module(s)).to(dev)
        last = s == n_stages - 1
        mod = _PeerWrap(gm, last, pipe.unflatten_output)
        peer_stages.append(peer.PipelineStage(mod, s, n_stages, dev))
    theirs = peer_cls(peer_stages[0] if spr == 1 else peer_stages, m, loss_fn=lm_loss)
    first, last = placement[0] == rank, placement[-1] == rank
    sides = {"pippy": (ours, [st.submod for st in ours_stages]), "peer": (theirs, [st.submod for st in peer_stages])}

    def step(side: str, sync: bool = True) -> None:
        sched, mods = sides[side]
        for mod in mods:
            mod.zero_grad(set_to_none=True)
        sched.step(*((x,) if first else ()), target=y if last else None)
        if sync and dev.type == "cuda":
            torch.cuda.synchronize(dev)

    report: dict[str, dict[str, Any]] = {}
    for side in ("pippy", "peer"):  # each side alone: its own peak memory
        step(side)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for _ in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            step(side)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        syncs, overlap = _syncs(dev, lambda s=side: step(s, sync=False))  # type: ignore[misc]
        report[side] = {"step": statistics.median(times), "peak": _peak_bytes(dev), "syncs": dict(syncs),
                        "overlap": overlap}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, report)
    if rank == 0:
        tokens = batch * seq
        print(f"bench GPT-2 {layers}x{width}, seq {seq}, batch {batch}, {m} micro-batches, {n_stages} stages on "
              f"{world} rank(s) ({dist.get_backend()}), {ours_cls.__name__} vs {peer_cls.__name__}, {steps} steps")
        for side in ("pippy", "peer"):
            r0 = gathered[0][side]
            peaks = ", ".join(f"{g[side]['peak'] / 2**20:.0f}" for g in gathered)
            syncs = ", ".join(f"{sum(g[side]['syncs'].values())}" for g in gathered)
            ov = ", ".join("n/a" if g[side]["overlap"] != g[side]["overlap"] else f"{100 * g[side]['overlap']:.0f}%"
                           for g in gathered)
            what = "max_memory_allocated" if dev.type == "cuda" else "peak RSS, whole process"
            print(f"bench {side:<6} step {r0['step'] * 1e3:9.1f} ms  {tokens / r0['step']:10.0f} tokens/s  "
                  f"peak MiB per rank ({what}) [{peaks}]  host syncs per step per rank [{syncs}]  "
                  f"send/recv kernel time under compute [{ov}]", flush=True)
        print(f"bench sync events (pippy, rank 0): {gathered[0]['pippy']['syncs'] or 'none'}")
        print(f"bench ratio pippy/peer step time: {gathered[0]['pippy']['step'] / gathered[0]['peer']['step']:.3f}")
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["transparency", "dist", "bench"])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    if a.device == "cuda" and torch.version.cuda is None:
        print(f"{sys.executable} has a CPU-only torch ({torch.__version__}, torch.version.cuda is None): run with "
              "PYTHON=<a Python whose torch is built with CUDA> benchmarks/gpu_check.sh, or gpu_check.sh --cpu",
              file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run gpu_check.sh --cpu for the CPU mode", file=sys.stderr)
        return 2
    if a.what == "transparency":
        torch.set_num_threads(2)
        return 0 if transparency(torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")) else 1
    if a.what == "dist":
        return 0 if dist_check(a.device) else 1
    bench(a.device, a.layers, a.width, a.seq, a.batch, a.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())

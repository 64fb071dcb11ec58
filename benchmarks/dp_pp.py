"""dp 2 x pp 2: FSDP2 (per block, then the stage) + 1F1B on a small Llama, pippy vs torch.distributed.pipelining.

Run:  .venv/bin/torchrun --nproc-per-node 4 benchmarks/dp_pp.py [--steps 10] [--schedule 1f1b] [--reshard-after-forward]

Both sides get the same stage modules (pippy's traced, split and structured stages, deep
copied) and shard them the same way: ``fully_shard`` on every decoder block of the stage, then
on the stage. Steps alternate between the two sides (one torchrun, same machine conditions).
Rank 0 prints the median step time of each side, the median of the per-step ratios
pippy/peer with its quartiles (below 1.0: pippy faster), and the data-parallel bytes each side
moves per step (FSDP2's all-gathers and gradient reductions, counted at torch.distributed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import pipelining as peer
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import pippy
from pippy import pipeline
from pippy.hf import split_spec_equal_layers

SCHEDULES = {"gpipe": (pippy.ScheduleGPipe, peer.ScheduleGPipe), "1f1b": (pippy.Schedule1F1B, peer.Schedule1F1B)}
_SIDE = ["none"]
_BYTES: dict[str, int] = {"pippy": 0, "peer": 0, "none": 0}
_CALLS: dict[str, int] = {}


def _count_collectives() -> None:
    """Add each DP collective's size (its full, unsharded tensor) to the side running now."""
    for name in ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor",
                 "all_reduce", "reduce_scatter"):
        inner = getattr(dist, name)

        def counted(*args: Any, _inner: Callable[..., Any] = inner, _name: str = name, **kwargs: Any) -> Any:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            lists = [t for a in (*args, *kwargs.values()) if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            sizes = [t.numel() * t.element_size() for t in tensors] or [sum(t.numel() * t.element_size() for t in lists)]
            _BYTES[_SIDE[0]] += max(sizes)
            _CALLS[_SIDE[0]] = _CALLS.get(_SIDE[0], 0) + 1
            return _inner(*args, **kwargs)

        setattr(dist, name, counted)


class _PeerWrap(nn.Module):
    """The peer passes tensors positionally and wants a tensor back from the last stage."""

    def __init__(self, gm: nn.Module, last: bool) -> None:
        super().__init__()
        self.gm, self.last = gm, last

    def forward(self, *xs: torch.Tensor) -> Any:
        out = self.gm(*xs)
        return out[0] if len(out) == 1 else tuple(out)


def _model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, use_cache=False)
    return LlamaForCausalLM(cfg)


def _loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _shard(module: nn.Module, blocks: nn.Module | None, mesh: Any, reshard: bool) -> None:
    for block in blocks.children() if blocks is not None else ():
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--schedule", choices=sorted(SCHEDULES), default="1f1b")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="rows per DP rank")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--reshard-after-forward", action="store_true",
                    help="fully_shard(reshard_after_forward=True): gather per forward (default: once per step)")
    a = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    dp, pp = mesh["dp"].get_local_rank(), mesh["pp"].get_local_rank()
    ours_cls, peer_cls = SCHEDULES[a.schedule]
    m = a.microbatches
    model = _model()
    g = torch.Generator().manual_seed(dp)
    x = torch.randint(0, 512, (a.batch, a.seq), generator=g)
    y = torch.randint(0, 512, (a.batch, a.seq), generator=g)
    pipe = pipeline(model, m, (x,), split_spec=split_spec_equal_layers(model, 2))
    ours_stage = pipe.build_stage(pp, "cpu", group=mesh)
    theirs_gm = copy.deepcopy(ours_stage.submod)  # the same structured stage module, before sharding
    _shard(ours_stage.submod, ours_stage.submod.model.layers, mesh["dp"], a.reshard_after_forward)
    ours = ours_cls(ours_stage, m, loss_fn=_loss)
    wrap = _PeerWrap(theirs_gm, pp == 1)
    _shard(wrap, theirs_gm.model.layers, mesh["dp"], a.reshard_after_forward)
    theirs_stage = peer.PipelineStage(wrap, pp, 2, torch.device("cpu"), group=mesh["pp"].get_group())
    theirs = peer_cls(theirs_stage, m, loss_fn=_loss)
    first, last = pp == 0, pp == 1
    _count_collectives()

    def run(side: str) -> float:
        stage_mod = ours_stage.submod if side == "pippy" else wrap
        stage_mod.zero_grad(set_to_none=True)
        dist.barrier()
        _SIDE[0] = side
        t0 = time.perf_counter()
        sched = ours if side == "pippy" else theirs
        sched.step(*((x,) if first else ()), target=y if last else None)
        dist.barrier()
        dt = time.perf_counter() - t0
        _SIDE[0] = "none"
        return dt

    times: dict[str, list[float]] = {"pippy": [], "peer": []}
    bytes_per_step: dict[str, list[int]] = {"pippy": [], "peer": []}
    calls_per_step: dict[str, list[int]] = {"pippy": [], "peer": []}
    for i in range(a.steps + 2):
        for side in (("pippy", "peer") if i % 2 == 0 else ("peer", "pippy")):
            before, calls = _BYTES[side], _CALLS.get(side, 0)
            dt = run(side)
            if i >= 2:  # warm-up
                times[side].append(dt)
                bytes_per_step[side].append(_BYTES[side] - before)
                calls_per_step[side].append(_CALLS.get(side, 0) - calls)
        if dist.get_rank() == 0 and i >= 2:
            print(f"step {i - 1:3d}/{a.steps}  pippy {times['pippy'][-1] * 1e3:7.1f} ms  "
                  f"peer {times['peer'][-1] * 1e3:7.1f} ms", flush=True)
    ratios = [o / t for o, t in zip(times["pippy"], times["peer"])]
    mine = torch.tensor([statistics.median(bytes_per_step["pippy"]), statistics.median(bytes_per_step["peer"]),
                         statistics.median(calls_per_step["pippy"]), statistics.median(calls_per_step["peer"])],
                        dtype=torch.float64)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    if dist.get_rank() == 0:
        q1, med, q3 = statistics.quantiles(ratios, n=4)
        total = torch.stack(everyone).sum(0)
        print(f"\ndp 2 x pp 2, FSDP2 per block + stage (reshard_after_forward={a.reshard_after_forward}), {a.schedule}, {m} micro-batches, Llama 4 x 128, "
              f"batch {a.batch}/DP rank, seq {a.seq}, {a.steps} steps")
        print(f"step time   pippy {statistics.median(times['pippy']) * 1e3:7.1f} ms   torch.distributed.pipelining "
              f"{statistics.median(times['peer']) * 1e3:7.1f} ms   paired ratio {med:.2f} [{q1:.2f}, {q3:.2f}] "
              "(<1: pippy faster)")
        print(f"DP collectives/step (all ranks)   pippy {int(total[2])} moving {total[0] / 2**20:.2f} MiB   "
              f"peer {int(total[3])} moving {total[1] / 2**20:.2f} MiB (full tensor size per collective)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

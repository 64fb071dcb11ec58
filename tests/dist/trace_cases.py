"""Traced real runs inside spawned ranks: the gathered timeline and the Chrome JSON of one step."""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist
from cases import MULTI, SINGLE, build

from pippy import pipeline


def traced_steps(rank: int, world: int, cases: list[tuple[str, int]], out_dir: str, n_mb: int = 4) -> dict[str, Any]:
    """For each (schedule, stages_per_rank): one traced step of ``mlp_spec``.

    Every rank returns the ``(rank, action)`` strings of its own ``last_events``; rank 0 also
    returns those of the gathered ``last_timeline`` and of the lowered schedule, and the path of
    the Chrome JSON it wrote.
    """
    report: dict[str, Any] = {}
    for sched_name, spr in cases:
        n_stages = world * spr
        model, args, _, target, loss_fn, opts = build("mlp_spec", n_stages)
        pipe = pipeline(model, n_mb, example_args=args, **opts)
        cls = SINGLE.get(sched_name) or MULTI[sched_name]
        placement = cls.placement(world, spr)
        mine = [pipe.build_stage(s, "cpu") for s in range(n_stages) if placement[s] == rank]
        path = os.path.join(out_dir, f"{sched_name}.json")
        sched = cls(mine[0] if spr == 1 else mine, n_mb, loss_fn=loss_fn, trace=path)
        first, last = placement[0] == rank, placement[-1] == rank
        for _ in range(2):  # the second step must replace, not extend, the first step's trace
            sched.step(*(args if first else ()), target=target if last else None)
        r: dict[str, Any] = {"own": sorted(f"{e.rank}:{e.action}" for e in sched.last_events)}
        if rank == 0:
            tl = sched.last_timeline
            assert tl is not None, f"{sched_name}: rank 0 has no last_timeline after a traced step"
            assert sched.schedule is not None
            r["timeline"] = sorted(f"{e.rank}:{e.action}" for e in tl.events)
            r["schedule"] = sorted(f"{rk}:{a}" for rk, acts in enumerate(sched.schedule.actions) for a in acts)
            r["num_ranks"] = tl.num_ranks
            r["ordered"] = all(e.end >= e.start >= 0.0 for e in tl.events)
            r["chrome"] = path
        else:
            assert sched.last_timeline is None, "only rank 0 gathers the timeline"
        report[sched_name] = r
        dist.barrier()
    return report


def ranked_profile(rank: int, world: int) -> dict[str, Any]:
    """``profile_ranks`` on a 2-stage ``mlp_spec``: every rank returns the merged model as a dict."""
    from pippy.sim.profile import profile_ranks

    model, args, _, target, loss_fn, opts = build("mlp_spec", world)
    pipe = pipeline(model, 2, example_args=args, **opts)
    placement = SINGLE["1f1b"].placement(world)
    costs = profile_ranks(pipe, args, placement, loss_fn=loss_fn, target=target, threads=1, repeats=1, warmup=0)
    sent = sum(m.nbytes for m in pipe.stage_infos[0].outputs)
    return {"costs": costs.to_dict(), "sent": float(sent)}


def skewed_clocks(rank: int, world: int, out_dir: str, wall_offset: float) -> dict[str, Any]:
    """Two traced 1F1B steps where rank 0 leaves the trace barrier 50 ms after rank 1, and rank 1's
    wall clock runs ``wall_offset`` seconds ahead (as on another host): every message's (send start,
    receive end) in rank 0's gathered timeline, and the latency calibration takes from it."""
    import time
    import types

    import pippy.runtime.ranks as ranks_mod
    import pippy.runtime.schedule_peers as peers
    from pippy.sim.calibrate import traced_latency
    from pippy.sim.cost import CostModel

    barrier = peers.trace_barrier

    def late_barrier(transport: Any, where: str) -> None:
        barrier(transport, where)
        if rank == 0:
            time.sleep(0.05)

    peers.trace_barrier = late_barrier  # type: ignore[assignment]
    if rank == 1 and wall_offset:  # another host, whose wall clock disagrees
        ranks_mod.time = types.SimpleNamespace(  # type: ignore[assignment]
            perf_counter=time.perf_counter, time=lambda: time.time() + wall_offset)
        ranks_mod._host = lambda: "another-host"  # type: ignore[assignment]
    model, args, _, target, loss_fn, opts = build("mlp_spec", world)
    pipe = pipeline(model, 4, example_args=args, **opts)
    sched = SINGLE["1f1b"](pipe.build_stage(rank, "cpu"), 4, loss_fn=loss_fn, trace=True)
    for _ in range(2):
        sched.step(*(args if rank == 0 else ()), target=target if rank == world - 1 else None)
    if rank != 0:
        return {}
    tl = sched.last_timeline
    assert tl is not None
    sends = {(e.action.kind.value[-1], e.action.mb): e for e in tl.events if e.action.kind.value.startswith("SEND")}
    recvs = [e for e in tl.events if e.action.kind.value.startswith("RECV")]  # 2 ranks: one sender per message
    pairs = [(str(s.action), s.start, str(r.action), r.end) for r in recvs
             if (s := sends.get((r.action.kind.value[-1], r.action.mb))) is not None]
    return {"pairs": pairs, "latency": traced_latency(CostModel.uniform(world), tl)}

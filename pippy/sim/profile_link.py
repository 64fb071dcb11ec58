"""Collective profiling pieces: the rank-to-rank link, medians of profiles, and costs agreed across data-parallel replicas.

Under pipeline × data parallelism each DP replica profiles its own pipeline, so replicas measure
different times, and a schedule that places work by ``costs=`` (ZB-V, ZB-H1) would order it
differently on each: the DP ranks of a stage must run the same order. :func:`agree_costs` takes
the field-wise median over the replicas, the same model on every rank.

    >>> a, b, c = (CostModel.uniform(1, f=t) for t in (1.0, 5.0, 2.0))
    >>> median_costs([a, b, c]).stages[0].f
    2.0
    >>> agree_costs(a, None) is a       # no data-parallel peers: unchanged
    True
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any

import torch

from pippy.sim.cost import CostModel, StageCost

__all__ = ["agree_costs", "measure_link", "median_costs", "split_mesh"]


def measure_link(group: Any = None, *, ranks: tuple[int, int] = (0, 1), nbytes: int = 4 << 20,
                 repeats: int = 20) -> tuple[float, float]:
    """``(latency s, bandwidth B/s)`` of one message between group ranks ``ranks``, by ping-pong.

    Collective over ``group``: every rank calls it and gets the same answer. One-way time is half
    a round trip (median of ``repeats``); latency is that of a 4-byte message, bandwidth comes from
    the extra time an ``nbytes`` message takes. Tensors are float32 on the CPU (gloo).

    Under torchrun, every rank calls ``latency, bandwidth = measure_link()``.
    """
    import torch.distributed as dist

    me = dist.get_rank(group)
    a, b = ranks
    peer = {a: b, b: a}.get(me)

    def glob(r: int) -> int:
        return r if group is None else int(dist.get_global_rank(group, r))

    def one_way(numel: int) -> float:
        buf = torch.zeros(numel)
        times = []
        for k in range(repeats + 3):
            t0 = time.perf_counter()
            if me == a:
                dist.send(buf, glob(b), group=group)
                dist.recv(buf, glob(b), group=group)
            else:
                dist.recv(buf, glob(a), group=group)
                dist.send(buf, glob(a), group=group)
            if k >= 3:
                times.append((time.perf_counter() - t0) / 2)
        return float(statistics.median(times))

    res: list[Any] = [None]
    if peer is not None:
        small, big = one_way(1), one_way(max(2, nbytes // 4))
        bw = (nbytes - 4) / (big - small) if big > small else float("inf")
        res = [(small, bw)]
    dist.broadcast_object_list(res, src=glob(a), group=group)
    lat, bw = res[0]
    return float(lat), float(bw)


def median_costs(models: Sequence[CostModel]) -> CostModel:
    """Field-wise median of profiles of the same pipe taken at different times.

    On a shared or noisy machine, profiling in short rounds interleaved with the measured steps
    (rather than once, before them) lets both see the same conditions; this merges the rounds.

        >>> a, b, c = (CostModel.uniform(1, f=t) for t in (1.0, 5.0, 2.0))
        >>> median_costs([a, b, c]).stages[0].f
        2.0
    """
    if not models:
        raise ValueError("median_costs needs at least one CostModel")
    n = models[0].num_stages
    if any(m.num_stages != n for m in models):
        raise ValueError(f"median_costs: models disagree on the stage count: {[m.num_stages for m in models]}")

    def med(xs: Iterable[float | None]) -> float | None:
        vals = [x for x in xs if x is not None]
        return float(statistics.median(vals)) if vals else None

    stages = []
    for s in range(n):
        kw = {f.name: med(getattr(m.stages[s], f.name) for m in models) for f in fields(StageCost)}
        stages.append(StageCost(**kw))  # type: ignore[arg-type]
    bw = statistics.median(m.bandwidth for m in models)  # inf (unmeasured) sorts last
    return CostModel(stages=stages, latency=float(statistics.median(m.latency for m in models)), bandwidth=float(bw),
                     microbatches=models[0].microbatches)


def split_mesh(group: Any, pp_dim: str = "pp") -> tuple[Any, tuple[Any, ...]]:
    """``(pipeline group, data-parallel groups)`` of a ``DeviceMesh`` (its ``pp_dim`` and every other dimension);
    a process group (or None) is the pipeline's group, with no DP groups.

        >>> split_mesh(None)
        (None, ())
    """
    if not (hasattr(group, "mesh_dim_names") and hasattr(group, "get_group")):
        return group, ()
    names = tuple(group.mesh_dim_names or ())
    if pp_dim not in names:
        raise ValueError(f"profile_ranks: the mesh has dimensions {names} and no {pp_dim!r} dimension for the "
                         f"pipeline. Expected group=mesh with a {pp_dim!r} dimension (pp_dim= names another), or "
                         f"group=mesh[{pp_dim!r}].get_group() and dp_group=")
    return group[pp_dim].get_group(), tuple(group[d].get_group() for d in names if d != pp_dim)


def _groups(dp_group: Any) -> tuple[Any, ...]:
    if dp_group is None:
        return ()
    if isinstance(dp_group, (tuple, list)):  # several groups (a mesh's DP dimensions): gathered one after another
        return tuple(g for one in dp_group for g in _groups(one))
    if hasattr(dp_group, "mesh") and hasattr(dp_group, "get_group"):  # a DeviceMesh: one group per dimension
        return tuple(dp_group.get_group(d) for d in range(dp_group.ndim))
    return (dp_group,)


def agree_costs(costs: CostModel, dp_group: Any) -> CostModel:
    """The median of every DP replica's ``costs`` (collective over ``dp_group``: a process group, a ``DeviceMesh``, or
    a sequence of those).

    Every rank gets the same model, gathered over one group per mesh dimension in turn.
    """
    import torch.distributed as dist

    models = [costs]
    for group in _groups(dp_group):
        if dist.get_world_size(group) < 2:
            continue
        parts: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, models, group=group)
        models = [m for part in parts for m in part]
    return costs if len(models) == 1 else median_costs(models)

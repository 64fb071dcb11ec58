"""Data-parallel peers of a stage: find their group, and check at the first step that they run the same pipeline.

Two DP ranks of one stage must run the same number of micro-batches under the same schedule:
FSDP2 gathers parameters once per forward, so different counts would leave one rank waiting in
a collective for ever. Before the first step every DP rank publishes what it runs in the DP
group's store and waits (bounded) for its peers; any difference is an error on every peer.

Under HSDP (``fully_shard`` on a 2-D replicate × shard mesh) the DP peers are every rank of that
mesh, and :func:`dp_group_of` returns the mesh itself (no single process group spans it).

    >>> import torch
    >>> dp_group_of(torch.nn.Linear(2, 2)) is None, dp_world_of(torch.nn.Linear(2, 2))  # no FSDP2, DDP or DTensor
    (True, None)
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch import nn

from pippy.runtime.ddp import DdpSync, _replicate_state
from pippy.runtime.watch import group_store

__all__ = ["DataParallelMismatch", "DataParallelWorld", "agree_stages_with_dp_peers", "agree_with_dp_peers",
           "dp_group_of", "dp_world_of"]

_COUNTS: dict[tuple[int, ...], itertools.count] = {}


class DataParallelMismatch(RuntimeError):
    """Data-parallel ranks of one stage do not run the same pipeline step."""


@dataclass(frozen=True, slots=True)
class DataParallelWorld:
    """The ranks a stage's gradients are reduced over (DDP, ``replicate``, FSDP2, HSDP) and how the reduction divides.

    ``groups``: process groups whose all-reduces, one after the other, sum over every rank of the
    world (one group; HSDP: one per mesh dimension). ``divide``: what the wrapper divides the
    summed gradients by: the world's size (an average) unless set otherwise (FSDP2's
    ``set_gradient_divide_factor``).

        >>> w = DataParallelWorld("hsdp", (0, 2, 4, 6), (), 4.0)
        >>> w.size, w.averages
        (4, True)
    """

    kind: str
    ranks: tuple[int, ...]
    groups: tuple[Any, ...]
    divide: float

    @property
    def size(self) -> int:
        """How many ranks hold a replica (or a shard) of the stage."""
        return len(self.ranks)

    @property
    def averages(self) -> bool:
        """Whether the reduction is a plain average over the world."""
        return self.divide == float(self.size)


def _fsdp_mesh(module: nn.Module) -> tuple[Any, float | None] | None:
    """The mesh FSDP2 reduces ``module``'s gradients over and its set divide factor (None: the mesh's size)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            group = getattr(sub._get_fsdp_state(), "_fsdp_param_group", None)
            info = getattr(group, "mesh_info", None)
            if info is not None:
                return info.mesh, getattr(group, "gradient_divide_factor", None)
    return None


def dp_world_of(module: nn.Module) -> DataParallelWorld | None:
    """The data-parallel world that reduces ``module``'s gradients (DDP, ``replicate``, FSDP2, HSDP), or None.

    Tensor parallelism alone (DTensor parameters without FSDP2) is not data parallel: None.
    """
    ddp = DdpSync.find(module)
    if ddp is not None:
        group = dp_group_of(module)
        ranks = tuple(dist.get_process_group_ranks(group))
        return DataParallelWorld("ddp" if ddp.wrapped else "replicate", ranks, (group,), float(len(ranks)))
    found = _fsdp_mesh(module)
    if found is None:
        return None
    mesh, factor = found
    ranks = tuple(sorted(int(r) for r in mesh.mesh.flatten().tolist()))
    groups = tuple(mesh.get_group(d) for d in range(mesh.ndim))
    return DataParallelWorld("hsdp" if mesh.ndim > 1 else "fsdp", ranks, groups,
                             float(factor) if factor else float(len(ranks)))


def dp_group_of(module: nn.Module) -> Any:
    """The process group over which ``module``'s gradients are reduced (FSDP2, DDP, replicate), or None.

    HSDP (FSDP2 on a 2-D replicate × shard mesh): that ``DeviceMesh``, whose ranks are the DP peers.
    """
    ddp = DdpSync.find(module)
    if ddp is not None:
        if ddp.wrapped:
            return module.process_group
        state = _replicate_state(module)
        built = getattr(state, "_ddp", None)  # the DDP that replicate builds at its first forward (its kwargs go)
        if built is not None and getattr(built, "process_group", None) is not None:
            return built.process_group
        kwargs = getattr(state, "_init_kwargs", {}) or {}
        mesh = kwargs.get("device_mesh")
        return kwargs.get("process_group") or (mesh.get_group() if mesh is not None else dist.group.WORLD)
    found = _fsdp_mesh(module)
    if found is not None:
        return found[0].get_group() if found[0].ndim == 1 else found[0]
    for p in module.parameters():
        mesh = getattr(p, "device_mesh", None)  # a DTensor parameter: tensor parallel (same pipeline on every rank)
        if mesh is not None and mesh.ndim == 1:
            return mesh.get_group()
    return None


def _ranks_and_store(group: Any) -> tuple[tuple[int, ...], Any]:
    """A process group's ranks and store; a multi-dimensional ``DeviceMesh``'s ranks and the world's store."""
    if hasattr(group, "mesh") and hasattr(group, "ndim"):
        if group.ndim == 1:
            group = group.get_group()
        else:
            return tuple(sorted(int(r) for r in group.mesh.flatten().tolist())), group_store(dist.group.WORLD)
    return tuple(dist.get_process_group_ranks(group)), group_store(group)


def agree_with_dp_peers(group: Any, facts: Mapping[str, Any], where: str, timeout: float) -> None:
    """Publish ``facts`` in ``group``'s store, wait up to ``timeout`` s for every peer's, raise on any difference.

    ``group``: a process group, or a ``DeviceMesh`` (HSDP) whose every rank is a peer.
    """
    ranks, store = _ranks_and_store(group)
    if len(ranks) < 2 or store is None:
        return
    me = dist.get_rank()
    n = next(_COUNTS.setdefault(ranks, itertools.count()))
    prefix = f"pippy-dp/{'-'.join(map(str, ranks))}/{n}"
    store.set(f"{prefix}/{me}", json.dumps(dict(facts)))
    keys = [f"{prefix}/{r}" for r in ranks if r != me]
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except Exception as exc:
        missing = [k.rsplit("/", 1)[1] for k in keys if not store.check([k])]
        raise DataParallelMismatch(
            f"{where}: waited {timeout:.0f}s for data-parallel ranks {missing} to start their first step; they never "
            "did. Expected every DP rank to build the same stages and call step(). Check that they all run this "
            "code path and pass the same mesh dimension as the pipeline's group (build_stage(..., group=mesh['pp'] "
            ".get_group()) or group=mesh on every rank; a rank that passed the data-parallel group there stops with "
            "a placement error of its own), or raise the limit with PIPPY_TIMEOUT"
        ) from exc
    for key in list(facts):
        values = {int(k.rsplit("/", 1)[1]): json.loads(store.get(k).decode()).get(key) for k in keys}
        if any(v != facts[key] for v in values.values()):
            lines = "\n".join(f"  rank {r}: {json.dumps(v)}" for r, v in sorted({me: facts[key], **values}.items()))
            raise DataParallelMismatch(
                f"{where}: the data-parallel ranks of this stage disagree on {key}:\n{lines}\nExpected every DP rank "
                "to pass the same micro-batch count, schedule and costs= (each DP rank's batch is its share of the global "
                "batch and splits into the same number of micro-batches); make them agree. Costs measured with "
                "pippy.sim.profile_ranks agree across DP replicas when it gets dp_group= (or group=mesh)"
            )


def agree_stages_with_dp_peers(modules: Sequence[nn.Module], facts: Mapping[str, Any], name: str,
                               timeout: float) -> None:
    """:func:`agree_with_dp_peers` once per distinct DP group of this rank's stage ``modules``."""
    seen: set[tuple[int, ...]] = set()
    for module in modules:
        group = dp_group_of(module)
        ranks = _ranks_and_store(group)[0] if group is not None else ()
        if len(ranks) > 1 and ranks not in seen:
            seen.add(ranks)
            where = f"{name}: rank {dist.get_rank()} (stages {facts.get('stages')}), before its first step"
            agree_with_dp_peers(group, facts, where, timeout)

"""Data-parallel peers of a stage: find their group, and check at the first step that they run the same pipeline.

Two DP ranks of one stage must run the same number of micro-batches under the same schedule:
FSDP2 gathers parameters once per forward, so different counts would leave one rank waiting in
a collective for ever. Before the first step every DP rank publishes what it runs in the DP
group's store and waits (bounded) for its peers; any difference is an error on every peer.

    >>> import torch
    >>> dp_group_of(torch.nn.Linear(2, 2)) is None      # no FSDP2, DDP or DTensor: no DP peers
    True
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch import nn

from pippy.runtime.ddp import DdpSync, _replicate_state
from pippy.runtime.watch import group_store

__all__ = ["DataParallelMismatch", "agree_stages_with_dp_peers", "agree_with_dp_peers", "dp_group_of"]

_COUNTS: dict[tuple[int, ...], itertools.count] = {}


class DataParallelMismatch(RuntimeError):
    """Data-parallel ranks of one stage do not run the same pipeline step."""


def dp_group_of(module: nn.Module) -> Any:
    """The process group over which ``module``'s gradients are reduced (FSDP2, DDP, replicate), or None."""
    ddp = DdpSync.find(module)
    if ddp is not None:
        if ddp.wrapped:
            return module.process_group
        kwargs = getattr(_replicate_state(module), "_init_kwargs", {}) or {}
        mesh = kwargs.get("device_mesh")
        return kwargs.get("process_group") or (mesh.get_group() if mesh is not None else dist.group.WORLD)
    for p in module.parameters():
        mesh = getattr(p, "device_mesh", None)  # a DTensor parameter: FSDP2 (fully_shard) or tensor parallel
        if mesh is not None and mesh.ndim == 1:
            return mesh.get_group()
    return None


def agree_with_dp_peers(group: Any, facts: Mapping[str, Any], where: str, timeout: float) -> None:
    """Publish ``facts`` in ``group``'s store, wait up to ``timeout`` s for every peer's, raise on any difference."""
    ranks = tuple(dist.get_process_group_ranks(group))
    store = group_store(group)
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
                "batch and splits into the same number of micro-batches); make them agree"
            )


def agree_stages_with_dp_peers(modules: Sequence[nn.Module], facts: Mapping[str, Any], name: str,
                               timeout: float) -> None:
    """:func:`agree_with_dp_peers` once per distinct DP group of this rank's stage ``modules``."""
    seen: set[tuple[int, ...]] = set()
    for module in modules:
        group = dp_group_of(module)
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else ()
        if len(ranks) > 1 and ranks not in seen:
            seen.add(ranks)
            where = f"{name}: rank {dist.get_rank()} (stages {facts.get('stages')}), before its first step"
            agree_with_dp_peers(group, facts, where, timeout)

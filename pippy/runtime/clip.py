"""Gradient clipping over the whole pipelined model: one global norm across stages, ranks and shards.

Clipping each stage by its own norm is silently wrong: ``torch.nn.utils.clip_grad_norm_`` on the
plain model scales every gradient by one factor computed from all of them. Here each rank sums
its stages' share (a tied weight counted once, however many stages hold a copy), the shares are
summed over the pipeline group (and over a DTensor's mesh for FSDP2/TP-sharded gradients), and
every rank scales by the same factor.

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> pipe = pipeline(net, 1, (torch.ones(1, 2),), split_spec={"0": SplitPoint.END})
    >>> stages = [pipe.build_stage(i, "cpu") for i in range(2)]           # both stages in this process
    >>> for st in stages:
    ...     for p in st.parameters():
    ...         p.grad = torch.full_like(p, 2.0)                            # 9 gradient entries of 2.0
    >>> round(float(clip_grad_norm_(stages, max_norm=1.0)), 4)              # sqrt(9 * 4)
    6.0
    >>> round(float(stages[1].submod.get_parameter("1.bias").grad), 4)      # scaled by 1 / 6
    0.3333
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from pippy.runtime.failedgroups import sending_group
from pippy.runtime.stage import Stage

__all__ = ["clip_grad_norm_", "grad_norm"]


def _stages_of(stages: Any) -> list[Stage]:
    if isinstance(stages, Stage):
        return [stages]
    if hasattr(stages, "stages") and not isinstance(stages, Iterable):  # a schedule
        return list(stages.stages)
    out = list(stages)
    for k, st in enumerate(out):
        if not isinstance(st, Stage):
            raise TypeError(
                f"clip_grad_norm_: stages[{k}] is {type(st).__name__}, expected a runtime stage; pass this rank's "
                "stages (pipe.build_stage(...)) or its schedule"
            )
    if not out:
        raise ValueError("clip_grad_norm_: no stage given; pass this rank's stages or its schedule")
    return out


def _pipeline_group(stages: Any, group: Any) -> Any:
    """``group``, else the group a schedule sends on (a fresh one after a failed step), else None (the stages')."""
    if group is not None:
        return group
    transport = getattr(stages, "transport", None)
    return getattr(transport, "p2p_group", getattr(transport, "group", None))


def _counted(stages: Sequence[Stage]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every gradient to scale, and those to count in the norm (each tied tensor once: in its first stage)."""
    pipe = stages[0].pipe
    not_mine: dict[int, set[str]] = {}
    for sp in getattr(pipe, "shared", []):
        owner = sp.stages[0]
        for s, fqn in sp.uses:
            if s != owner:
                not_mine.setdefault(s, set()).add(fqn)
    scale, count, seen = [], [], set()
    for st in stages:
        for name, p in st.unwrapped.named_parameters(remove_duplicate=False):
            if p.grad is None or id(p) in seen:
                continue
            seen.add(id(p))
            scale.append(p.grad)
            if name not in not_mine.get(st.index, set()):
                count.append(p.grad)
    return scale, count


def _local_norm(g: torch.Tensor, norm_type: float) -> torch.Tensor:
    """``g``'s norm; for a DTensor (FSDP2/TP shard) the norm of the full tensor (a collective over its mesh)."""
    n = torch.linalg.vector_norm(g, norm_type)
    full = getattr(n, "full_tensor", None)
    return (full() if full is not None else n).to(torch.float64)


def grad_norm(stages: Any, norm_type: float = 2.0, *, group: Any = None) -> torch.Tensor:
    """The norm of the whole model's gradient, the same on every pipeline rank (a collective when distributed).

    ``group`` is the pipeline process group (default: the stages' group); every rank of it calls this.

        >>> import torch
        >>> from pippy import pipeline
        >>> stage = pipeline(torch.nn.Linear(3, 1), 1, (torch.ones(1, 3),)).build_stage(0, "cpu")
        >>> for p in stage.parameters():
        ...     p.grad = torch.ones_like(p)
        >>> round(float(grad_norm(stage)), 4), float(grad_norm(stage, float("inf")))
        (2.0, 1.0)
    """
    mine = _stages_of(stages)
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise ValueError(f"grad_norm: norm_type must be positive (or float('inf')), got {norm_type}")
    group = _pipeline_group(stages, group)
    _, count = _counted(mine)
    norms = [_local_norm(g, norm_type) for g in count]
    dev = count[0].device if count else mine[0].device
    if math.isinf(norm_type):
        local = torch.stack(norms).max() if norms else torch.zeros((), dtype=torch.float64)
    else:
        local = torch.stack([n ** norm_type for n in norms]).sum() if norms else torch.zeros((), dtype=torch.float64)
    total = local.to(dev)
    if dist.is_available() and dist.is_initialized():
        own = mine[0].group if mine[0].group is not None else dist.group.WORLD
        pg = sending_group(group if group is not None else own)
        if dist.get_world_size(pg) > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM, group=pg)
    total = total if math.isinf(norm_type) else total ** (1.0 / norm_type)
    if not count:
        return total
    return total.to(count[0].real.dtype if count[0].is_complex() else count[0].dtype)  # a norm is real


def clip_grad_norm_(
    stages: Any,
    max_norm: float,
    norm_type: float = 2.0,
    *,
    group: Any = None,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Scale every gradient of this rank's stages as ``torch.nn.utils.clip_grad_norm_`` would on the plain model.

    Call it on every pipeline rank after ``step()`` and before ``optimizer.step()``, with this
    rank's stages (or its schedule). Returns the total norm (before clipping), the same on every
    rank (in the gradients' dtype). ``group`` defaults to the schedule's pipeline group, or to the
    stages' group. See the module docstring for an example.
    """
    mine = _stages_of(stages)
    total = grad_norm(mine, norm_type, group=_pipeline_group(stages, group))
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"clip_grad_norm_: the total norm of order {norm_type} of the gradients of stages "
            f"{[st.index for st in mine]} (and the other pipeline ranks) is {float(total)}, so they cannot be "
            "clipped. Find the non-finite gradient (check_finite=True on the schedule names the micro-batch whose "
            "loss is not finite), or pass error_if_nonfinite=False"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    scale, _ = _counted(mine)
    for g in scale:
        g.mul_(coef.to(device=g.device, dtype=g.dtype))
    return total

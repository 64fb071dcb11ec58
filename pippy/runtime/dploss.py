"""Loss seeds under data parallelism, scaled so that the DP wrapper's reduction gives the global batch's gradient.

DDP, ``replicate`` and FSDP2 (HSDP too) divide the summed gradients of the DP ranks by their
count ``D`` (``divide``: FSDP2's ``set_gradient_divide_factor`` sets another). Each rank seeds its
backward with its own share of the loss, so that average is the global batch's gradient only for
a mean over equal shares. So the seeds become:

- mean (``loss_reduction="mean"``): ``loss / m * divide / D``, 1x under a plain average.
- sum (``"sum"``, ``num_items_in_batch`` + ``"sum"``): ``loss * divide``: the sum over every rank.
- counted mean (``ignore_index``, class weights): each micro-batch's sum ``* divide / N``, where
  ``N`` is the count of the whole global batch, all-reduced over the DP world once per step.

    >>> w = DataParallelWorld("ddp", (0, 2), (), 2.0)
    >>> seed_factor(w, "mean"), seed_factor(w, "sum"), seed_factor(None, "sum")
    (1.0, 2.0, 1.0)
"""

from __future__ import annotations

import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from pippy.runtime.ddp import DdpSync
from pippy.runtime.dpgroup import DataParallelWorld, dp_world_of

__all__ = ["global_count", "loss_world", "seed_factor"]

_WARNED: set[int] = set()


def seed_factor(world: DataParallelWorld | None, reduction: str | None) -> float:
    """What this rank's loss seed is multiplied by so that ``world``'s reduction gives the global gradient."""
    if world is None:
        return 1.0
    return world.divide / world.size if reduction == "mean" else world.divide


def _custom_hook(module: nn.Module) -> str | None:
    """The name of a DDP comm hook not from torch (whose reduction pippy cannot know), or None."""
    sync = DdpSync.find(module)
    if sync is None:
        return None
    try:
        ddp = sync.ddp()
    except RuntimeError:  # replicate() before its first forward: no hook registered yet
        return None
    for hook, _ in getattr(ddp, "_comm_hooks", ()):
        if not getattr(hook, "__module__", "").startswith("torch.distributed.algorithms"):
            return getattr(hook, "__qualname__", repr(hook))
    return None


def loss_world(module: nn.Module, where: str) -> DataParallelWorld | None:
    """The DP world of the stage ``module`` that holds the loss; warns once about a DDP comm hook pippy cannot read.

        >>> loss_world(torch.nn.Linear(2, 2), "stage 1") is None
        True
    """
    world = dp_world_of(module)
    if world is None:
        return None
    hook = _custom_hook(module)
    if hook is not None and id(module) not in _WARNED:
        _WARNED.add(id(module))
        warnings.warn(
            f"{where}: the DDP stage has the comm hook {hook}, which pippy cannot read. pippy scales the loss as if "
            f"it averaged over the {world.size} DP ranks (as torch's hooks do), so that gradients equal the plain "
            "model's on the global batch; a hook that sums instead gives gradients times the DP size",
            stacklevel=3,
        )
    return world


def global_count(world: DataParallelWorld, count: torch.Tensor, timeout: float, where: str) -> torch.Tensor:
    """``count`` summed over every rank of ``world`` (one all-reduce per group, each waited on for ``timeout`` s).

        >>> global_count(DataParallelWorld("ddp", (0,), (), 1.0), torch.tensor(3), 60.0, "stage 1")  # no peers
        tensor(3)
    """
    total = count.detach().clone().to(torch.float64 if count.is_floating_point() else torch.int64)
    for group in world.groups:
        if dist.get_world_size(group) < 2:
            continue
        try:
            work = dist.all_reduce(total, group=group, async_op=True)
            if work is not None and work.wait(timeout=timedelta(seconds=timeout)) is False:
                raise TimeoutError(f"all-reduce not done after {timeout:.0f}s")
        except Exception as exc:
            raise RuntimeError(
                f"{where}: summing the loss's target count over the data-parallel ranks {list(world.ranks)} "
                f"(expected every one to reach this step within {timeout:.0f}s) failed: {exc}. Expected every DP rank "
                "to call step() with the same schedule and a class-index target; raise PIPPY_TIMEOUT if they are slow"
            ) from exc
    return total


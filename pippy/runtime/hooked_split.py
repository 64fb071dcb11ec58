"""Split backward (I / W) for stages whose hooks must see every pass: FSDP2, DDP, hooked blocks.

Zero-bubble schedules split a stage's backward into I (input gradients) and W (weight
gradients). pippy's fast path runs a flat tapped copy of the stage and computes W in closed form,
outside any module hook. Some stages need their hooks: FSDP2 gathers parameters in pre-forward
and pre-backward hooks and reduces gradients in post-backward ones, DDP all-reduces from
gradient hooks, and users hook blocks. Such a stage runs its own module instead:
- **F**: the stage's module, hooks and all.
- **I**: one autograd pass to the stage inputs, keeping the graph.
- **W**: a second pass to the parameters, gathering FSDP2's shards first.

Data-parallel gradients must be reduced once, after every micro-batch's gradient is in. So the
stage's last I of the step runs every W still pending, and then a full backward (B) with
gradient sync on. The schedule's later W for those micro-batches have nothing left to do.

    >>> plan = HookedSplit({1: None}, n_microbatches=2)
    >>> plan.promotes(1), plan.promotes(0)
    (True, False)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.modules.module as _module_hooks
from torch.nn.utils import parametrize

from pippy.runtime.ddp import DdpSync
from pippy.runtime.recompute import RECOMPUTED_MARK
from pippy.runtime.stage import Stage

__all__ = ["HookedSplit", "fsdp_sync", "has_block_hooks"]

_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def has_block_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` carries what a flat tapped copy would skip: forward hooks (on any module, the stage's own
    included, or torch's global ones from ``register_module_forward_hook``), recompute on a submodule, backward
    hooks on any module or global, gradient hooks on a parameter (``p.register_hook``,
    ``register_post_accumulate_grad_hook``), or a parametrized weight (``weight_norm``, ``spectral_norm``).

        >>> lin = torch.nn.Sequential(torch.nn.Linear(1, 1))
        >>> has_block_hooks(lin), lin[0].register_forward_hook(lambda *a: None) is not None, has_block_hooks(lin)
        (False, True, True)
        >>> lin = torch.nn.Linear(1, 1)
        >>> lin.weight.register_hook(lambda g: g * 2) is not None, has_block_hooks(lin)
        (True, True)
        >>> lin = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(1, 1))
        >>> has_block_hooks(lin)
        True
    """
    if any(getattr(_module_hooks, name, None) for name in _GLOBAL_HOOKS):
        return True
    for name, mod in module.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks or (name and RECOMPUTED_MARK in vars(mod)):
            return True  # the stage's own recompute (on the root) runs in the tapped copy too
        if mod._backward_hooks or getattr(mod, "_backward_pre_hooks", None) or parametrize.is_parametrized(mod):
            return True
    return any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in module.parameters())


def fsdp_sync(module: Any) -> Callable[[bool], None] | None:
    """For an FSDP2 stage: before each backward, ``f(last)`` reduces gradients, reshards and finalizes only in the step's last.

        >>> fsdp_sync(torch.nn.Linear(1, 1)) is None   # not sharded
        True

    Between a step's backwards the parameters stay gathered (no all-gather per micro-batch
    backward); resharding after forward stays the user's choice (``fully_shard(reshard_after_forward=...)``).
    """
    sync = getattr(module, "set_requires_gradient_sync", None)
    if not callable(sync):
        return None
    reshard = getattr(module, "set_reshard_after_backward", None)
    is_last = getattr(module, "set_is_last_backward", None)

    def f(last: bool) -> None:
        sync(last)
        if callable(reshard):
            reshard(last)
        if callable(is_last):
            is_last(last)  # the end-of-backward work (waiting for reductions) only in the step's last

    return f


class HookedSplit:
    """This step's I/W bookkeeping for the data-parallel stages that split their backward through hooks.

    ``sync`` maps each such stage to its FSDP2 sync setter (``f(last)``), or None for a DDP stage.
    """

    def __init__(self, sync: dict[int, Callable[[bool], None] | None], n_microbatches: int) -> None:
        self.sync = sync
        self.n = n_microbatches
        self.inputs_done: dict[int, int] = {}
        self.pending_w: dict[int, list[int]] = {}
        self.done_w: set[tuple[int, int]] = set()
        for setter in sync.values():
            if setter is not None:
                setter(False)  # every pass of the step but the last reduces nothing

    def promotes(self, s: int) -> bool:
        """Stage ``s`` reduces its gradients in its last I of the step, turned into a full backward."""
        return s in self.sync

    def backward(self, stage: Stage, mb: int, grads: Sequence[torch.Tensor | None] | None, ddp: DdpSync | None,
                 *, split: bool) -> list[torch.Tensor | None]:
        """I (``split``) or B of ``mb``; the step's last of them runs the pending W's, then a full backward that reduces."""
        s = stage.index
        done = self.inputs_done[s] = self.inputs_done.get(s, 0) + 1
        if done < self.n:
            if not split:  # a schedule may run some micro-batches unsplit: gradients accumulate, unreduced
                return stage.backward(mb, grads)
            self.pending_w.setdefault(s, []).append(mb)
            return stage.backward_input(mb, grads)
        for early in self.pending_w.pop(s, []):
            stage.backward_weight(early)
            self.done_w.add((s, early))
        setter = self.sync[s]
        if setter is not None:
            setter(True)
        elif ddp is not None:
            ddp.last_backward(stage.held_outputs(mb))
        self.done_w.add((s, mb))
        return stage.backward(mb, grads)

    def weight(self, stage: Stage, mb: int) -> Any:
        """W of ``mb``: run it, unless the reducing backward already did."""
        s = stage.index
        if (s, mb) in self.done_w:
            return None
        pending = self.pending_w.get(s, [])
        if mb in pending:
            pending.remove(mb)
        stage.backward_weight(mb)
        return None

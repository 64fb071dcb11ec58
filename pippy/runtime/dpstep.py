"""One step's data-parallel wiring on a rank: which stages reduce gradients (DDP, FSDP2) and when.

A stage wrapped in DDP or FSDP2 must reduce its gradients once per step, in the backward of its
last micro-batch. :class:`DataParallelStep` finds those stages at the start of a step, routes
split-backward stages that need their hooks through :class:`~pippy.runtime.hooked_split.HookedSplit`,
turns gradient sync on for the last whole backward (B) of the others, and closes DDP's step at the end.

    >>> import torch
    >>> from pippy import pipeline
    >>> from pippy.runtime.stage import Stage
    >>> pipe = pipeline(torch.nn.Linear(2, 2), 2, (torch.ones(4, 2),))
    >>> dp = DataParallelStep({0: Stage(pipe, 0)}, split_backward=set(), n_microbatches=2, training=True)
    >>> dp.any, dp.hsplit is not None and dp.hsplit.sync
    (False, {})
"""

from __future__ import annotations

from collections.abc import Callable

from pippy.runtime.ddp import DdpSync
from pippy.runtime.hooked_split import HookedSplit, fsdp_sync, has_block_hooks
from pippy.runtime.stage import Stage

__all__ = ["DataParallelStep"]


class DataParallelStep:
    """The data-parallel state of one step for this rank's ``stages`` (see the module docstring).

    Also marks each split-backward stage whose hooks must run (FSDP2, DDP, hooked blocks) to go
    through its own module (``Stage.through_hooks``).
    """

    def __init__(self, stages: dict[int, Stage], *, split_backward: set[int], n_microbatches: int,
                 training: bool) -> None:
        self.stages, self.n_microbatches = stages, n_microbatches
        self.ddp = {s: h for s, stage in stages.items() if (h := DdpSync.find(stage.submod)) is not None}
        self.grad_sync: dict[int, Callable[[bool], None]] = {
            s: f for s, stage in stages.items() if s not in self.ddp and (f := fsdp_sync(stage.submod)) is not None}
        self._b_done: dict[int, int] = {}  # per data-parallel stage, this step's B actions so far
        if training:
            for h in self.ddp.values():
                h.start()
        hooked = {s for s in split_backward
                  if s in self.grad_sync or s in self.ddp or has_block_hooks(stages[s].submod)}
        for s, stage in stages.items():
            stage.through_hooks = s in hooked
        self.hsplit = HookedSplit({s: self.grad_sync.get(s) for s in hooked if s in self.grad_sync or s in self.ddp},
                                  n_microbatches) if training else None

    @property
    def any(self) -> bool:
        """Whether any stage here reduces gradients across data-parallel ranks."""
        return bool(self.ddp or self.grad_sync)

    def reduces(self, s: int) -> bool:
        """Whether stage ``s`` reduces its gradients across data-parallel ranks (DDP or FSDP2)."""
        return s in self.ddp or s in self.grad_sync

    @property
    def fixed(self) -> set[int]:
        """Stages whose W's gather FSDP2 shards: they run in the schedule's order on every DP rank, never early."""
        return set(self.hsplit.sync) if self.hsplit is not None else set()

    def before_b(self, s: int, mb: int) -> None:
        """Before a whole backward (B) of stage ``s``: sync gradients only in the step's last one.

        (Split-backward data-parallel stages reduce through :class:`HookedSplit` instead.)
        """
        setter, ddp = self.grad_sync.get(s), self.ddp.get(s)
        if setter is None and ddp is None:
            return
        done = self._b_done[s] = self._b_done.get(s, 0) + 1
        last = done == self.n_microbatches
        if setter is not None:
            setter(last)
        elif last and ddp is not None:
            ddp.last_backward(self.stages[s].held_outputs(mb))

    def finish(self) -> None:
        """End of the step: DDP's reducer closes it."""
        for h in self.ddp.values():
            h.finish()

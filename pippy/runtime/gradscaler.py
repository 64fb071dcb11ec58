"""Loss scaling (fp16) across pipeline ranks: one scale and one skip decision for the whole model.

``torch.amp.GradScaler`` decides per process: it skips ``optimizer.step()`` when *its* gradients
hold an inf or NaN, and backs its scale off. In a pipeline only the last stage's rank scales the
loss, and an overflow there leaves the other ranks' gradients finite: their scalers would step
while the last one skips, and their scales drift apart, unscaling later gradients by the wrong
factor. :class:`PipelineGradScaler` starts every rank at the same scale (the first stage's rank
never calls ``scale``), and ``unscale_`` (which ``step`` runs) agrees on "found an inf" across the
group, so every rank skips or steps together and the scales stay equal.

    >>> import torch
    >>> from pippy import pipeline
    >>> stage = pipeline(torch.nn.Linear(3, 1), 1, (torch.ones(1, 3),)).build_stage(0, "cpu")
    >>> opt = torch.optim.SGD(stage.submod.parameters(), lr=0.1)
    >>> scaler = PipelineGradScaler("cpu", init_scale=4.0)
    >>> for p in stage.submod.parameters():
    ...     p.grad = torch.full_like(p, float("inf"))
    >>> scaler.step(opt); scaler.update()   # a rank whose loss was never scaled: no error; the inf skips the step
    >>> scaler.get_scale()
    2.0
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.amp.grad_scaler import GradScaler

__all__ = ["PipelineGradScaler"]


class PipelineGradScaler(GradScaler):  # type: ignore[misc]
    """``torch.amp.GradScaler`` whose inf check and scale are the same on every rank of ``group`` (default: all).

    Use it as the plain scaler, on every rank: ``loss_fn=lambda out, y: scaler.scale(loss(out, y))`` for the
    schedule, then after ``step()`` on each rank ``scaler.unscale_(opt)`` (optional: before clipping),
    ``scaler.step(opt)``, ``scaler.update()``. ``unscale_`` is a collective over ``group`` (with data
    parallelism, all ranks: a sharded gradient's inf must stop every replica): call it, or ``step``, once per
    step for one optimizer on every rank (one optimizer over all of a rank's stages).
    """

    def __init__(self, device: str = "cuda", *args: Any, group: Any = None, **kwargs: Any) -> None:
        super().__init__(device, *args, **kwargs)
        self.group = group

    def _check_scale_growth_tracker(self, funcname: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scale is None:  # a rank that never scaled a loss (it holds no last stage): the initial scale
            self._lazy_init_scale_growth_tracker(torch.device(self._device))
        return super()._check_scale_growth_tracker(funcname)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale ``optimizer``'s gradients; then agree with every rank of the group on whether any found an inf."""
        if not self._enabled:
            return
        super().unscale_(optimizer)
        assert self._scale is not None
        state = self._per_optimizer_states[id(optimizer)]
        found = state["found_inf_per_device"]
        anywhere = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        for v in found.values():
            anywhere = torch.maximum(anywhere, v.to(anywhere.device))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(anywhere, op=dist.ReduceOp.MAX, group=self.group)
        if not found:  # no gradient here: the others' verdict still decides this rank's step and scale
            found[self._scale.device] = anywhere
        for dev in list(found):
            found[dev] = anywhere.to(found[dev].device)

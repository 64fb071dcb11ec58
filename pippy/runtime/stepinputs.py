"""One step's inputs for the executor: the batch split into micro-batches, the targets, the loss and its scale.

Also the checks of a step's call itself: ``eval()``'s own options, and no ``step()`` under ``no_grad``.

A mixin of :class:`pippy.runtime.schedule_base.PipelineSchedule` (``_inputs``), which also
measures a loss's reduction on the first micro-batch when it cannot be read off ``loss_fn``.
Under data parallelism the loss seeds are scaled (``pippy.runtime.dploss``) so that the DP
reduction gives the global batch's gradient for mean, sum and counted-mean losses alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from pippy.frontend.precision import autocast_state
from pippy.microbatch import split_batch, split_value
from pippy.runtime.countedmean import CountedMean, counted_mean
from pippy.runtime.dpgroup import DataParallelWorld
from pippy.runtime.dploss import global_count, loss_world, seed_factor
from pippy.runtime.loss import measure_reduction, target_spec
from pippy.runtime.owncount import OwnLossCounts
from pippy.runtime.ownscale import OwnScale
from pippy.runtime.stage import StageError
from pippy.runtime.stepstate import StepInputs

__all__ = ["StepInputsMixin", "eval_options", "refuse_no_grad"]


class StepInputsMixin:
    """Splits a step's batch and targets and picks its loss (mixed into the schedule base, which sets these).

    A batch of 8 rows in 4 micro-batches; a mean loss scales each micro-batch's by 1/4:

        >>> from pippy import Schedule1F1B, pipeline
        >>> from pippy.runtime.localcomm import LocalTransport
        >>> stage = pipeline(torch.nn.Linear(3, 1), 4, (torch.ones(8, 3),)).build_stage(0, "cpu")
        >>> sched = Schedule1F1B(stage, 4, torch.nn.functional.mse_loss, transport=LocalTransport.world(1)[0])
        >>> step = sched._inputs((torch.ones(8, 3),), {}, torch.zeros(8, 1), training=True)
        >>> len(step.microbatches), step.microbatches[0][0].shape, len(step.targets), step.loss_scale
        (4, torch.Size([2, 3]), 4, 0.25)
    """

    n_microbatches: int
    name: str
    rank: int
    pipe: Any
    loss_fn: Callable[..., torch.Tensor] | None
    loss_reduction: str | None
    target_chunk_spec: Any
    check_finite: bool
    _counted: CountedMean | None
    _own_counter: OwnLossCounts | None  # the model's own counted-mean loss, when it has one (every rank alike)
    _probe_loss: bool
    holds: Callable[[int], bool]  # the schedule's: whether this rank holds a stage
    _warn_once: Callable[[str, str], None]
    trains: bool  # the schedule's: whether something gives a loss
    stages: list[Any]  # the schedule's: this rank's stages
    transport: Any  # the schedule's: its timeout bounds the DP count's all-reduce

    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any], target: Any, training: bool,
                loss_kwargs: dict[str, Any] | None = None, built_for: int | None = None) -> StepInputs:
        m = self.n_microbatches
        if built_for is not None and m != built_for:
            raise ValueError(
                f"{self.name}: rank {self.rank}, action step start: n_microbatches is {m}, but this schedule was "
                f"built (and its order made) for {built_for}. Expected it unchanged after construction: build a new "
                "schedule with the new count on every rank"
            )
        now, traced = autocast_state(), getattr(self.pipe, "traced_autocast", None)
        if now != traced and not getattr(self.pipe, "manual", False):
            def say(state: tuple[str, str] | None) -> str:
                return "without torch.autocast" if state is None else f"under torch.autocast({state[0]!r}, dtype={state[1]})"
            raise StageError(
                f"{self.name}: rank {self.rank}: the pipe was traced {say(traced)} but this step runs {say(now)}; "
                "the traced stage edges carry the dtypes of the trace (autocast computes linear layers in bfloat16), "
                "so the two must agree. Expected pipeline() and every step() under the same autocast context"
            )
        mbs, stage_kwargs = None, None
        if getattr(self.pipe, "manual", False) and kwargs:  # hand-cut stages: each rank's kwargs go to its stages
            try:
                stage_kwargs = [k for _, k in split_batch((), kwargs, m, None, self.pipe.kwargs_chunk_spec)]
            except ValueError as exc:
                raise ValueError(f"{self.name}: rank {self.rank}, splitting the keyword inputs of its stages "
                                 f"(action: step input): {exc}") from None
            kwargs = {}
        if self.holds(0):
            if not args and not kwargs and stage_kwargs is None:
                call = getattr(type(self), "stage_call", False)  # the forward pipeline behind stage(x)
                raise StageError(
                    f"{'stage(x)' if call else self.name}: rank {self.rank} holds stage 0 but "
                    f"{'stage()' if call else 'step()/eval()'} got no inputs; pass the batch here "
                    f"({'stage(x)' if call else 'step(x)'} on this rank; the other ranks pass none)"
                )
            try:
                mbs = self.pipe.split_inputs(args, kwargs, m)
            except ValueError as exc:
                raise ValueError(f"{self.name}: rank {self.rank}, stage 0, splitting the batch (action: step input): "
                                 f"{exc}") from None
        elif args or (kwargs and stage_kwargs is None):
            self._warn_once(
                "inputs",
                f"rank {self.rank} does not hold stage 0: the inputs given to step()/eval() here are ignored (only "
                "the rank holding stage 0 reads the batch, as in PiPPy and PyTorch's pipelining package)",
            )
        targets = None
        scored = training or (target is not None and self.loss_fn is not None)  # eval(x, target=y): losses too
        if scored and self.holds(self.pipe.num_stages - 1):
            if training and self.loss_fn is not None and target is None:
                raise StageError(
                    f"rank {self.rank}, stage {self.pipe.num_stages - 1} (last): loss_fn is set but target is None; "
                    "call step(..., target=y) on the rank holding the last stage"
                )
            if target is not None:
                try:
                    tspec = target_spec(self.pipe, target, m, self.target_chunk_spec)
                    targets = split_value(target, m, tspec, what="target")
                except ValueError as exc:
                    raise ValueError(f"{self.name}: rank {self.rank}, stage {self.pipe.num_stages - 1}, splitting the "
                                     f"target (action: step target): {exc}") from None
        last = self.pipe.num_stages - 1
        world = None  # the loss's stage reduces over data-parallel ranks: its seeds are scaled (pippy.runtime.dploss)
        if training and self.holds(last):
            held = next(st for st in self.stages if st.index == last)
            world = loss_world(held.submod, f"{self.name}: rank {self.rank}, stage {last}")
        scale = (1.0 / m if self.loss_reduction == "mean" else 1.0) * seed_factor(world, self.loss_reduction)
        loss_fn, counts, counted = self.loss_fn, None, self._counted
        if loss_kwargs and loss_fn is not None:  # step(..., loss_kwargs=): each micro-batch's loss_fn call gets them
            loss_fn = functools.partial(loss_fn, **loss_kwargs)
            counted = counted_mean(loss_fn) if counted is not None else None
        if training and counted is not None and targets is not None and counted.applies(target):
            loss_fn = counted.sum_fn  # eval(target=) reports each micro-batch's own mean: loss_fn as given
            counts = ([counted.count(t) for t in targets], counted.count(target))
            if world is not None:  # each seed: its sum * divide / the global batch's count
                where = f"{self.name}: rank {self.rank}, stage {last}, action step target (every micro-batch)"
                counts = (counts[0], global_count(world, counts[1], self.transport.timeout, where) / world.divide)
        probe = None
        if self._probe_loss and targets is not None and training and loss_fn is not None:
            probe = functools.partial(self._measured_scale, tspec, loss_fn, world)
        own, own_trained = None, False
        if self._own_counter is not None:  # the model's own counted mean: exact (pippy.runtime.ownscale)
            held = self.holds(self.pipe.num_stages - 1)
            own_trained = training and loss_fn is None and self.loss_reduction == "mean"
            own = OwnScale(self._own_counter if held else None, [], seed_factor(world, "sum"), world)
        return StepInputs(mbs, targets, loss_fn, training, scale, check_finite=self.check_finite, probe=probe,
                          counts=counts, stage_kwargs=stage_kwargs, own=own, own_trained=own_trained)

    def note_unused_target(self, opts: dict[str, Any]) -> None:
        """Warn (once) when ``eval()`` gets ``target=`` / ``losses=`` but nothing gives a loss to compute with them."""
        if not self.trains and (opts.get("target") is not None or opts.get("losses") is not None):
            self._warn_once("eval target", f"{type(self).__name__}.eval() got target= / losses=, but the schedule has "
                            "no loss_fn and the model's output has no loss: the target is not used and losses stays "
                            "empty. Pass loss_fn=... to the schedule to get each micro-batch's loss")

    def _measured_scale(self, target_spec: Any, loss_fn: Callable[..., torch.Tensor],
                        world: DataParallelWorld | None, out: Any, target: Any, loss: torch.Tensor) -> float:
        """The first micro-batch's loss scale, once ``loss_fn``'s reduction is measured on it (``measure_reduction``)."""
        self._probe_loss = False
        self.loss_reduction = measure_reduction(type(self).__name__, loss_fn, self.pipe, target_spec, out, target,
                                                loss)
        return (1.0 / self.n_microbatches if self.loss_reduction == "mean" else 1.0) * \
            seed_factor(world, self.loss_reduction)


def eval_options(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take ``eval()``'s own options (``target``, ``losses``, ``loss_kwargs``) out of ``kwargs``, except those the
    model takes as keyword inputs of the same name.

        >>> import torch
        >>> from pippy import pipeline
        >>> kw = {"target": 1, "mask": 2}
        >>> eval_options(pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),)), kw), kw
        ({'target': 1}, {'mask': 2})
    """
    taken = set(pipe.keyword_inputs)
    return {k: kwargs.pop(k) for k in ("target", "losses", "loss_kwargs") if k in kwargs and k not in taken}


def refuse_no_grad(where: str) -> None:
    """Raise when ``step()`` is called under ``torch.no_grad()``: no loss would have a gradient.

        >>> with torch.no_grad():
        ...     refuse_no_grad("gpipe")
        Traceback (most recent call last):
        ...
        pippy.runtime.stage.StageError: gpipe: step() runs under torch.no_grad() (or inference_mode), so no loss would have a gradient. Expected step() outside it; use eval(...) for a forward-only pass
    """
    if not torch.is_grad_enabled():
        raise StageError(f"{where}: step() runs under torch.no_grad() (or inference_mode), so no loss would have a "
                         "gradient. Expected step() outside it; use eval(...) for a forward-only pass")

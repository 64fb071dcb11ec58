"""One step's inputs for the executor: the batch split into micro-batches, the targets, the loss and its scale.

Also the checks of a step's call itself: ``eval()``'s own options, and no ``step()`` under ``no_grad``.
``step(..., loss_kwargs=)`` wraps ``loss_fn`` in them, and its reduction (so the loss scale) is read
again on that wrapped call at every step (``_kwargs_reduction``).

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
from pippy.microbatch.errors import value_error_like
from pippy.runtime.countedmean import CountedMean, counted_mean
from pippy.runtime.dpgroup import DataParallelWorld
from pippy.runtime.dploss import global_count, loss_world, seed_factor
from pippy.runtime.loss import describe, infer_reduction, measure_reduction, named_reduction, target_spec
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
    _own_warn: OwnLossCounts | None  # such a loss pippy cannot make exact (a (loss, logits) tuple): warned about
    _probe_loss: bool
    _given_reduction: str | None  # loss_reduction= as given to the schedule (None: read off loss_fn)
    _kwargs_measured: dict[tuple[Any, ...], str]  # reductions measured with step(loss_kwargs=), by their names/values
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
                raise value_error_like(exc)(f"{self.name}: rank {self.rank}, splitting the keyword inputs of its "
                                            f"stages (action: step input): {exc}") from None
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
                raise value_error_like(exc)(f"{self.name}: rank {self.rank}, stage 0, splitting the batch (action: "
                                            f"step input): {exc}") from None
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
                    raise value_error_like(exc)(f"{self.name}: rank {self.rank}, stage {self.pipe.num_stages - 1}, "
                                                f"splitting the target (action: step target): {exc}") from None
        last = self.pipe.num_stages - 1
        world = None  # the loss's stage reduces over data-parallel ranks: its seeds are scaled (pippy.runtime.dploss)
        if training and self.holds(last):
            held = next(st for st in self.stages if st.index == last)
            world = loss_world(held.submod, f"{self.name}: rank {self.rank}, stage {last}")
        loss_fn, counts, counted = self.loss_fn, None, self._counted
        reduction, measure = self.loss_reduction, (() if self._probe_loss else None)  # (): measure the schedule's
        if loss_kwargs and loss_fn is not None:  # step(..., loss_kwargs=): each micro-batch's loss_fn call gets them
            loss_fn = functools.partial(loss_fn, **loss_kwargs)
            if scored and self.holds(last):  # what they make of the reduction (read again at every step)
                reduction, counted, measure = self._kwargs_reduction(loss_fn, loss_kwargs)
        elif loss_kwargs and scored and self.holds(last):
            self._warn_once("loss_kwargs", f"{self.name}: rank {self.rank}: step()/eval() got loss_kwargs="
                            f"{_kwargs_text(loss_kwargs)}, but the schedule has no loss_fn (the model's own loss is "
                            "trained on), so they are not used. Pass loss_fn=... to use them, or give the model the "
                            "keyword inputs it takes")
        scale = (1.0 / m if reduction == "mean" else 1.0) * seed_factor(world, reduction)
        if training and counted is not None and targets is not None and counted.applies(target):
            loss_fn = counted.sum_fn  # eval(target=) reports each micro-batch's own mean: loss_fn as given
            counts = ([counted.count(t) for t in targets], counted.count(target))
            if world is not None:  # each seed: its sum * divide / the global batch's count
                where = f"{self.name}: rank {self.rank}, stage {last}, action step target (every micro-batch)"
                counts = (counts[0], global_count(world, counts[1], self.transport.timeout, where) / world.divide)
        probe = None
        if measure is not None and targets is not None and training and loss_fn is not None:
            probe = functools.partial(self._measured_scale, tspec, loss_fn, world, measure)
        own, own_trained = None, False
        counter = self._own_counter or self._own_warn
        if counter is not None:  # the model's own counted mean: exact, or warned about (pippy.runtime.ownscale)
            held = self.holds(self.pipe.num_stages - 1)
            exact = self._own_counter is not None
            own_trained = exact and training and loss_fn is None and self.loss_reduction == "mean"
            own = OwnScale(counter if held else None, scale, world, warn_only=not exact)
        return StepInputs(mbs, targets, loss_fn, training, scale, check_finite=self.check_finite, probe=probe,
                          counts=counts, stage_kwargs=stage_kwargs, own=own, own_trained=own_trained)

    def note_unused_target(self, opts: dict[str, Any]) -> None:
        """Warn (once) when ``eval()`` gets ``target=`` / ``losses=`` but nothing gives a loss to compute with them."""
        if not self.trains and (opts.get("target") is not None or opts.get("losses") is not None):
            self._warn_once("eval target", f"{type(self).__name__}.eval() got target= / losses=, but the schedule has "
                            "no loss_fn and the model's output has no loss: the target is not used and losses stays "
                            "empty. Pass loss_fn=... to the schedule to get each micro-batch's loss")

    def _kwargs_reduction(self, loss_fn: functools.partial[torch.Tensor], loss_kwargs: dict[str, Any]
                          ) -> tuple[str | None, CountedMean | None, tuple[Any, ...] | None]:
        """This step's reduction of ``loss_fn`` (the schedule's, given ``loss_kwargs``), its counted form, and the key
        its measure is kept under where it is measured on this step's first micro-batch (``_measured_scale``).

        A reduction the schedule was given (``loss_reduction=``) stays, and ``loss_kwargs`` naming another is an
        error; else it is read again off ``loss_fn`` (``reduction="sum"`` sums, whatever the bare ``loss_fn`` does),
        or, where it cannot be read, measured once per set of keyword names and plain values.
        """
        torch_loss = _is_torch_loss(loss_fn)  # a user's function may mean its own reduction= / reduce= otherwise
        said = named_reduction(loss_kwargs) if torch_loss else loss_kwargs.get("reduction")
        shown = f"{self.name}: rank {self.rank}, stage {self.pipe.num_stages - 1} (last), action step loss_kwargs"
        if said == "none" and not torch_loss:  # it reduces the per-element losses itself (a weighted sum)
            return self.loss_reduction, None, None
        if said == "none":
            raise ValueError(
                f"{shown}: loss_kwargs={_kwargs_text(loss_kwargs)} make loss_fn return one loss per element, but each "
                "micro-batch needs a scalar loss (its backward seed, and its entry in losses=). How to fix: "
                "reduction='sum' or 'mean' in loss_kwargs (or no reduction there: loss_fn's own), or reduce the "
                "per-element losses inside loss_fn (e.g. a weighted sum)"
            )
        given = self._given_reduction
        if given is not None and getattr(self, "_reduction_option", None) == "scale_grads":
            return given, None, None  # PyTorch's scale_grads= decides, as in its pipelining package
        if given is not None:
            if said in ("sum", "mean") and said != given:
                raise ValueError(
                    f"{shown}: loss_kwargs={_kwargs_text(loss_kwargs)} make loss_fn {said}-reduce, but the schedule was "
                    f"built with loss_reduction={given!r}, so the micro-batch losses would be combined as "
                    f"{'a mean' if given == 'mean' else 'a sum'} and every gradient would be off by a factor of "
                    f"{self.n_microbatches}. Expected the two to agree: pass loss_reduction={said!r} (or leave it "
                    "unset: pippy then reads the reduction off loss_kwargs at each step), or drop reduction= from "
                    "loss_kwargs"
                )
            return given, None, None
        found = infer_reduction(loss_fn)
        if found is not None:
            return found, counted_mean(loss_fn), None
        key = tuple(sorted((k, v if isinstance(v, str | int | float | bool | None) else type(v).__name__)
                           for k, v in loss_kwargs.items()))
        known = self._kwargs_measured.get(key)
        return known or self.loss_reduction, None, None if known else key

    def _measured_scale(self, target_spec: Any, loss_fn: Callable[..., torch.Tensor], world: DataParallelWorld | None,
                        key: tuple[Any, ...], out: Any, target: Any, loss: torch.Tensor) -> float:
        """The first micro-batch's loss scale, once ``loss_fn``'s reduction is measured on it (``measure_reduction``):
        kept as the schedule's (``key`` empty), or as that of ``loss_kwargs`` like this step's (``key``)."""
        found = measure_reduction(type(self).__name__, loss_fn, self.pipe, target_spec, out, target, loss)
        if not key:
            self._probe_loss, self.loss_reduction = False, found
        else:
            self._kwargs_measured[key] = found
        return (1.0 / self.n_microbatches if found == "mean" else 1.0) * seed_factor(world, found)


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



def _kwargs_text(kwargs: dict[str, Any]) -> str:
    """``loss_kwargs`` for a message, a tensor as its dtype and shape.

        >>> _kwargs_text({"reduction": "none", "weight": torch.ones(3)})
        "{'reduction': 'none', 'weight': float32[3]}"
    """
    return "{" + ", ".join(f"{k!r}: {describe(v) if isinstance(v, torch.Tensor) else repr(v)}"
                           for k, v in kwargs.items()) + "}"


def _is_torch_loss(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` (through ``functools.partial``) is one of torch's losses, whose keywords mean what torch says.

        >>> import torch.nn.functional as F
        >>> _is_torch_loss(functools.partial(F.cross_entropy, ignore_index=0)), _is_torch_loss(lambda o, t: o.sum())
        (True, False)
    """
    while isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    return isinstance(loss_fn, torch.nn.modules.loss._Loss) or getattr(loss_fn, "__module__", "") == "torch.nn.functional"

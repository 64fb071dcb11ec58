"""The schedule driver every schedule class shares: split the batch, run the executor, merge, trace.

Gradient rule: with ``loss_reduction="mean"`` each micro-batch loss is scaled by
``1/n_microbatches`` before backward, so for a mean-reduced ``loss_fn`` and equal micro-batches
every ``.grad`` equals ``loss_fn(model(full_batch), full_target).backward()``. With ``"sum"``
losses are not scaled and grads equal the full-batch sum. Left unset, it is read off ``loss_fn``
(``nn.MSELoss(reduction="sum")`` sums); a ``loss_fn`` that does not say is measured on the first
micro-batch (``pippy.runtime.loss.measure_reduction``), and gets "mean" and a warning when that fails.
Without ``loss_fn``, ``step()`` trains on the model's own loss when its output has one, else
runs forward only (as PiPPy and PyTorch's pipelining package do), with a warning.

A step runs in three public parts, the same for every driver: ``begin`` (split the batch, start
the executor), driving the returned :class:`StepRun` to its end (``run_blocking`` under
torch.distributed; the in-process driver interleaves all ranks' runs), and ``finish`` (record
the trace, merge the outputs). A new schedule class only says what to generate:

    >>> from pippy.schedules.generators import gpipe
    >>> class OneRankGPipe(PipelineSchedule):
    ...     name = "one_rank_gpipe"
    ...     def _generate(self) -> Schedule:
    ...         return gpipe(1, self.n_microbatches)
    >>> import torch
    >>> from pippy import pipeline
    >>> from pippy.runtime.localcomm import LocalTransport
    >>> from pippy.runtime.stage import Stage
    >>> pipe = pipeline(torch.nn.Linear(2, 1), 2, (torch.ones(4, 2),))
    >>> sched = OneRankGPipe(Stage(pipe, 0), 2, torch.nn.functional.mse_loss, transport=LocalTransport.world(1)[0])
    >>> sched.step(torch.ones(4, 2), target=torch.zeros(4, 1)).shape
    torch.Size([4, 1])
    >>> sched
    OneRankGPipe(rank 0 of 1, stages [0], n_microbatches=2, loss_fn=mse_loss, steps=1)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pippy.frontend.lostgrad import TRAIN_REFUSAL
from pippy.frontend.notice import warn_user
from pippy.microbatch import Sum
from pippy.runtime.comm import DistTransport
from pippy.runtime.countedmean import counted_mean
from pippy.runtime.executor import Executor
from pippy.runtime.guards import check_loss_fn
from pippy.runtime.infershapes import infer_stage_shapes, shapes_pending
from pippy.runtime.loss import choose_reduction, loss_index
from pippy.runtime.lossadvice import scalar_first_hint
from pippy.runtime.manual import exchange, link_stages, needs_link
from pippy.runtime.owncount import OwnLossCounts
from pippy.runtime.ownscale import own_weighted
from pippy.runtime.ranks import check_one_group, gather_trace
from pippy.runtime.schedule_order import RunOrder
from pippy.runtime.schedule_peers import PeerStanding
from pippy.runtime.stage import Stage, StageError
from pippy.runtime.stepinputs import StepInputsMixin, eval_options, refuse_no_grad
from pippy.runtime.steprun import StepRun
from pippy.runtime.transport import Transport
from pippy.runtime.watch import drop_at_exit
from pippy.schedules.ir import Schedule
from pippy.sim.cost import CostModel
from pippy.sim.render import path_problem
from pippy.sim.timeline import Event, Timeline

__all__ = ["PipelineSchedule", "StepRun"]


class PipelineSchedule(StepInputsMixin, RunOrder, PeerStanding):
    """Base of all schedule classes: splits the batch, runs the executor, merges outputs.

    ``stages`` is this rank's stage (or list of stages for multi-stage schedules). Pass
    ``transport`` only to drive ranks in-process (see ``pippy.runtime.local``). With
    ``fuse_backward`` (default) an I directly followed by its own W runs as one B, and a stage
    whose inputs need no gradient (the first, usually) runs a whole B at each W's place instead
    of I then W; ``"auto"`` does so only when that simulates faster under the class's ``costs``
    (default costs without them; see :func:`pippy.sim.choose.fastest_form`), and for a generated
    schedule then keeps split each B whose input gradient others wait for, where that simulates
    faster (:func:`pippy.sim.unfuse.split_where_faster`), and moves actions earlier on their rank
    where that simulates faster (:func:`pippy.sim.reorder.reorder_where_faster`). The schedule actually
    run is ``self.schedule`` (lowered), which is also what to simulate. With ``fill_bubbles`` (default) a
    generated schedule first has each W moved into the earliest idle gap the class's costs predict
    it fits (:func:`pippy.sim.compact.compact_w`: in simulation never slower, never more memory), and at run time
    a rank that would wait for a message runs a later W instead, when the previous step waited that
    long there (see ``pippy.runtime.wfill``). Both keep results bitwise those of the generated
    order; an explicit ``schedule=`` is run as given. ``costs`` (a
    :class:`~pippy.sim.cost.CostModel`, e.g. from ``pippy.profile``; default:
    :func:`~pippy.sim.choose.default_costs`) are what those choices simulate. Every subclass is
    used the same way, e.g. ``ScheduleGPipe(stage, 8, loss_fn=F.cross_entropy).step(x, target=y)``
    (the module docstring runs one).
    """

    name = "custom"
    multi_stage = False

    def __init__(
        self,
        stages: Stage | Sequence[Stage],
        n_microbatches: int,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        *,
        loss_reduction: str | None = None,
        target_chunk_spec: Any = None,
        output_merge_spec: Any = None,
        timeout: float | None = None,
        trace: bool | str = False,
        transport: Transport | None = None,
        schedule: Schedule | None = None,
        fuse_backward: bool | str = True,
        fill_bubbles: bool = True,
        check_finite: bool = False,
        costs: CostModel | None = None,
    ) -> None:
        self.stages = [stages] if isinstance(stages, Stage) else list(stages)
        check_one_group(self.stages)  # at least one stage, all over one process group
        if not isinstance(n_microbatches, int) or n_microbatches < 1:
            raise ValueError(f"n_microbatches must be a positive int, got {n_microbatches!r}")
        if loss_reduction not in ("mean", "sum", None):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum' (or None: read it off loss_fn), got {loss_reduction!r}")
        if needs_link(self.stages):  # hand-cut stages: learn the other ranks' shapes, check the chain
            link_stages(self.stages, exchange(self.stages, self.stages[0].group, timeout) if transport is None else None)
        self.pipe = self.stages[0].pipe
        tied = {f for sp in self.pipe.shared if not sp.requires_grad for _, f in sp.uses}
        for st in self.stages:  # (other unfrozen parameters are checked at each forward: usergrad.check_traced)
            for name in st.unfrozen_params():
                if name in tied:
                    raise StageError(
                        f"stage {st.index}: tied parameter {name} was frozen (requires_grad=False) when the model was "
                        "traced but is trainable now; its copies' gradients are summed only when traced trainable, "
                        "so call pipeline() again after changing requires_grad"
                    )
        self.n_microbatches = n_microbatches
        self.costs = costs
        self._given_reduction = loss_reduction
        self._set_loss_fn(loss_fn)
        self._warned: set[str] = set()
        self.target_chunk_spec = target_chunk_spec
        self.output_merge_spec = output_merge_spec
        if transport is None:
            transport = DistTransport(self.stages[0].group, timeout, self.stages[0].device)
            for stage in self.stages:
                drop_at_exit(stage, "group")
        self.transport = transport
        self.rank = self.transport.rank
        env_trace = os.environ.get("PIPPY_TRACE")
        self.trace_path: str | None = trace if isinstance(trace, str) else (env_trace or None)
        self.trace = bool(trace) or bool(env_trace)
        problem = path_problem(self.trace_path) if self.trace_path else None
        if problem:  # found now, not after the first step has run
            given = f"trace={trace!r}" if isinstance(trace, str) else f"PIPPY_TRACE={env_trace!r}"
            raise ValueError(f"{given}: cannot write the Chrome trace there: {problem}; pass a path in an existing, "
                             "writable folder (or trace=True to keep the timeline in last_timeline only)")
        self.last_events: list[Event] = []
        self.last_timeline: Timeline | None = None
        self._executors: dict[int, Executor] = {}
        self.fill_bubbles = fill_bubbles
        self.check_finite = check_finite
        self._agreed = False
        self._calls = 0  # steps begun: their parity keeps the messages of consecutive calls apart (Edge.tag)
        self._broken: str | None = None
        self.last_peak_live: dict[int, int] = {}
        self.last_peak_bytes: dict[int, int] = {}
        self._fuse_backward = fuse_backward
        if not isinstance(fuse_backward, bool) and fuse_backward != "auto":
            raise ValueError(f"fuse_backward must be True, False or 'auto', got {fuse_backward!r}")
        self.schedule: Schedule | None = None
        self._eval_schedule: Schedule | None = None
        try:
            compute = schedule if schedule is not None else self._generate()
            if compute is not None:  # None: a base class with no order of its own, until _load_csv / _load_actions
                self._install(compute, generated=schedule is None)
        except Exception as exc:  # the other ranks would wait for this one's first messages until their timeout
            self._tell_others(f"rank {self.rank}, building {type(self).__name__}", exc)
            raise

    def _set_loss_fn(self, loss_fn: Callable[..., torch.Tensor] | None) -> None:
        """Use ``loss_fn`` from the next step on: what it trains on, and how its micro-batch losses combine."""
        own = None if loss_fn is not None else loss_index(self.pipe.out_spec, self.pipe.stage_infos[-1].outputs)
        trains = loss_fn is not None or own is not None
        lost = getattr(self.pipe, "lost_backward", None)
        if trains and lost:
            raise StageError(
                f"{type(self).__name__}: the model's forward uses {'; '.join(lost)}. A pipe's backward is autograd's "
                f"over the traced operations, so training would give other gradients than the model. {TRAIN_REFUSAL}"
            )
        reduction, probe = choose_reduction(type(self).__name__, loss_fn, self.pipe, own, self._given_reduction, trains)
        self._loss, self._own_loss, self.trains = loss_fn, own, trains  # _own_loss: the model's own loss output
        # the model's own mean over counted targets, trained (or merged) exactly: the same on every rank
        counter, exact = OwnLossCounts.of_pipe(self.pipe)
        self._own_counter, self._own_warn = (counter, None) if exact else (None, counter)
        # a mean over counted targets (ignore_index, class weights) stays exact across micro-batches
        self._counted = counted_mean(loss_fn) if self._given_reduction is None else None
        self.loss_reduction, self._probe_loss, self._kwargs_measured = reduction, probe, {}

    @property
    def loss_fn(self) -> Callable[..., torch.Tensor] | None:
        """The loss each micro-batch's output is scored with; assigning another takes effect at the next step."""
        return self._loss

    @loss_fn.setter
    def loss_fn(self, fn: Callable[..., torch.Tensor] | None) -> None:
        check_loss_fn(type(self).__name__, fn, self.pipe.num_stages - 1, self.rank)
        self._set_loss_fn(fn)

    _loss_fn = loss_fn  # PyTorch pipelining's attribute name (frameworks assign it)

    def __repr__(self) -> str:
        """One line: class, rank, stages held, micro-batches, loss_fn and options (the module doc shows one)."""
        opts = [f"fuse_backward={self._fuse_backward!r}"] if self._fuse_backward is not True else []
        opts += [f"trace={self.trace_path or True!r}"] if self.trace else []
        opts += ["check_finite=True"] if self.check_finite else []
        opts += ["fill_bubbles=False"] if not self.fill_bubbles else []
        fn = self._loss
        name = "None" if fn is None else getattr(fn, "__name__", type(fn).__name__)
        return (f"{type(self).__name__}(rank {self.rank} of {self.transport.world_size}, stages "
                f"{sorted(st.index for st in self.stages)}, n_microbatches={self.n_microbatches}, loss_fn={name}"
                f"{''.join(', ' + o for o in opts)}, steps={self._calls})")

    # ------------------------------------------------------------------ subclass hooks
    def _num_ranks(self) -> int:
        return self.transport.world_size

    def _generate(self) -> Schedule | None:
        raise NotImplementedError

    # ------------------------------------------------------------------ running
    def holds(self, stage_index: int) -> bool:
        """True when this rank holds stage ``stage_index``."""
        return any(st.index == stage_index for st in self.stages)

    def begin(
        self,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        target: Any = None,
        training: bool = True,
        return_outputs: bool = True,
        origin: float | None = None,
        loss_kwargs: dict[str, Any] | None = None,
    ) -> StepRun:
        """Start one step on this rank: split the batch, start the executor; drive the returned run, then :meth:`finish`.

        ``args`` / ``kwargs`` are the model's own inputs (full batch, on the rank holding stage 0),
        kept apart from the options so that a model argument named like one (``target``) still
        reaches the model. ``training=False`` is a forward-only step (:meth:`eval`); ``origin`` (a
        ``time.perf_counter()`` value) is time zero of the trace, shared by in-process ranks.
        """
        kwargs = dict(kwargs or {})
        self._check_usable()
        self._load_changed_order()  # pipeline_order[r] = [...] written and not loaded yet (runtime/peer_attrs)
        plan = self.schedule if training else self._eval_schedule
        if self._eval_schedule is None:
            raise StageError(
                f"{type(self).__name__} has no order of its own yet: load one with _load_csv(path) or "
                "_load_actions({rank: [actions]}) on every rank, or use a schedule class such as Schedule1F1B"
            )
        if plan is None:
            raise StageError(f"{self.name} is a forward-only schedule; use eval(), or a training schedule for step()")
        self._refuse_if_stale()
        try:
            if self.pipe is not self.stages[0].pipe:  # hand-cut stages whose shapes another schedule learned
                self.pipe = self.stages[0].pipe
                self._set_loss_fn(self._loss)
                self._executors.clear()
                self._agreed = False
            if shapes_pending(self.stages):  # hand-cut stages without input_args: learn the shapes on this batch
                board = getattr(self.transport, "_claim", lambda: None)()
                infer_stage_shapes(self.stages, self.stages[0].group, self.transport.timeout, self.n_microbatches,
                                   args, kwargs, failed=board.failure if board is not None else lambda: None)
                self.pipe = self.stages[0].pipe
                self._set_loss_fn(self._loss)  # the model's own loss output, if any, is known now
                self._executors.clear()  # their message plans were made for the shapes before
                self._agreed = False
            inp = self._inputs(args, kwargs, target, training, loss_kwargs, built_for=plan.n_microbatches)
        except Exception as exc:  # bad input on this rank: the others would wait for it until their timeout
            self._tell_others(f"rank {self.rank}, before its step", exc)
            raise
        inp.keep_outputs = return_outputs
        inp.phase = (self._calls % 2) * 2 + int(training) + 4 * getattr(self.transport, "parity", lambda: 0)()
        self._calls += 1
        if not self._agreed:
            self._agree()
        if self.trace and isinstance(self.transport, DistTransport):  # a common origin for every rank's clock
            self._trace_barrier()
        ex = self._executor(plan)
        none = training and all(p.grad is None for st in self.stages for p in st.parameters())
        return StepRun(self, ex, ex.run(inp, time.perf_counter() if origin is None else origin), training=training,
                       grads_were_none=none)

    def finish(self, run: StepRun, losses: list[Any] | None = None) -> Any:
        """End a step that ran to its end: keep its trace and counts, fill ``losses``, merge the outputs.

        Returns the merged output on the rank holding the last stage, else None.
        """
        if run.result is None:
            raise StageError(f"rank {self.rank}: finish() needs a step that ran to its end; drive the StepRun first")
        res = run.result
        self._check_losses(losses)
        if run.training:  # the step ran to its end here (its count is saved with checkpoints)
            for st in self.stages:
                st.steps_trained += 1
        self.last_events = res.events
        if res.peak_live or not self.last_peak_live:  # eval() keeps the last training step's counts
            self.last_peak_live = res.peak_live
            self.last_peak_bytes = res.peak_bytes
        if self.trace and isinstance(self.transport, DistTransport):
            where = f"rank {self.rank}, stages {sorted(st.index for st in self.stages)}, action trace gather " \
                    f"(after step {self._calls}, every micro-batch)"
            try:
                self.last_timeline = gather_trace(self.transport, self.rank, res.events, self.name, self.trace_path,
                                                  where, origin=run.executor.t_origin)
            except Exception as exc:
                self._tell_others(where, exc)
                raise
        if losses is not None and self.holds(self.pipe.num_stages - 1):
            if hasattr(losses, "clear"):  # this step's losses only, as in PyTorch's pipelining (a list reused)
                losses.clear()
            losses.extend(res.losses)
        if not self.holds(self.pipe.num_stages - 1) or not res.outputs:
            return None
        outputs = own_weighted(self._own_counter, self.pipe, res.outputs, res.own_counts)  # runtime/ownscale
        spec = self.output_merge_spec
        if spec is None and self._own_loss is not None:  # the step's loss merges as the step reduced it
            n = len(self.pipe.stage_infos[-1].outputs)
            spec = self.pipe.default_merge_spec(n) or [None] * n
            spec[self._own_loss] = Sum(mean=self.loss_reduction == "mean")
        return self.pipe.merge_outputs(outputs, spec)

    def forward_only_notice(self) -> str:
        """What ``step()`` says when nothing gives a loss, so that it runs forward only."""
        return (f"{type(self).__name__} has no loss_fn and the model's output has no loss, so step() ran forward "
                "only (no gradients), as in PiPPy and PyTorch's pipelining package. Pass loss_fn=... to train, or "
                "call .eval() for a forward-only step." + scalar_first_hint(self.pipe))

    def _executor(self, sched: Schedule) -> Executor:
        ex = self._executors.get(id(sched))
        if ex is None:
            ex = self._executors[id(sched)] = Executor(self.stages, sched, self.transport, trace=self.trace,
                                                           fill_bubbles=self.fill_bubbles)
        return ex

    def step(
        self,
        *args: Any,
        target: Any = None,
        losses: list[Any] | None = None,
        return_outputs: bool = True,
        loss_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """One training step over the batch: forward and backward of every micro-batch (forward only without a loss).

        Gradients accumulate into each stage's parameters (call ``optimizer.zero_grad()`` between
        steps). Returns the merged output on the rank holding the last stage, else None;
        ``return_outputs=False`` saves the memory of keeping every micro-batch's output;
        ``loss_kwargs`` go to every ``loss_fn(output, target, **loss_kwargs)`` call, unsplit.
        """
        self._check_losses(losses)
        if not self.trains:
            self._warn_once("forward", self.forward_only_notice())
            with torch.no_grad():
                run = self.begin(args, kwargs, target=None, training=False, return_outputs=return_outputs)
                run.run_blocking()
                return self.finish(run, losses)
        refuse_no_grad(f"{self.name}: rank {self.rank}")  # before anything starts: the schedule stays usable
        run = self.begin(args, kwargs, target=target, return_outputs=return_outputs, loss_kwargs=loss_kwargs)
        run.run_blocking()
        return self.finish(run, losses)

    def _check_losses(self, losses: Any) -> None:
        if losses is not None and not hasattr(losses, "extend"):
            raise TypeError(f"{self.name}: rank {self.rank}: step(losses=...) must be a list that gets each "
                            f"micro-batch's loss (its contents are replaced), got {type(losses).__name__}; pass losses=[]")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn_user(message)

    def eval(self, *args: Any, **kwargs: Any) -> Any:
        """Forward only, keeping no autograd graph; merged output on the last stage's rank, else None.

        As in PyTorch's pipelining package, ``eval(x, target=y, losses=losses)`` also fills ``losses`` with each
        micro-batch's ``loss_fn`` value on the last stage's rank (replacing what it held) (``loss_kwargs=`` as in
        :meth:`step`). A model whose own keyword inputs carry one of those names keeps them.
        """
        opts = eval_options(self.pipe, kwargs)
        self._check_losses(opts.get("losses"))
        self.note_unused_target(opts)
        with torch.no_grad():
            run = self.begin(args, kwargs, target=opts.get("target"), training=False,
                             loss_kwargs=opts.get("loss_kwargs"))
            run.run_blocking()
        return self.finish(run, opts.get("losses"))


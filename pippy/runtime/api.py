"""Schedule classes users call: ``step()`` to train, ``eval()`` to infer; all run on the one executor.

Gradient rule: with ``loss_reduction="mean"`` (default) each micro-batch loss is scaled by
``1/n_microbatches`` before backward, so for a mean-reduced ``loss_fn`` and equal micro-batches
every ``.grad`` equals ``loss_fn(model(full_batch), full_target).backward()``. For a sum-reduced
``loss_fn`` pass ``loss_reduction="sum"``: losses are not scaled and grads equal the full-batch sum.

    >>> # sched = ScheduleGPipe(stage, n_microbatches=4, loss_fn=torch.nn.functional.mse_loss)
    >>> # out = sched.step(x, target=y, losses=losses)     # x on the first rank, target on the last
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from pippy.microbatch import merge_chunks, split_value
from pippy.runtime.comm import DistTransport, Transport
from pippy.runtime.executor import Executor, StepInputs, StepResult
from pippy.runtime.stage import PipelineStage, StageError
from pippy.schedules import generators as gen
from pippy.schedules.ir import Schedule, loop_placement, v_placement
from pippy.schedules.lower import lower
from pippy.schedules.validate import validate
from pippy.sim.timeline import Event, Timeline

__all__ = [
    "PipelineSchedule",
    "Schedule1F1B",
    "ScheduleDualPipeV",
    "ScheduleFromCSV",
    "ScheduleGPipe",
    "ScheduleInterleaved1F1B",
    "ScheduleLoopedBFS",
    "ScheduleZBH1",
    "ScheduleZBH2",
    "ScheduleZBV",
    "run_forward_pipeline",
]


class PipelineSchedule:
    """Base of all schedule classes: splits the batch, runs the executor, merges outputs.

    ``stages`` is this rank's stage (or list of stages for multi-stage schedules). Pass
    ``transport`` only to drive ranks in-process (see ``pippy.runtime.local``).

        >>> # ScheduleGPipe(stage, 8, loss_fn=F.cross_entropy).step(x, target=y)
    """

    name = "custom"
    multi_stage = False

    def __init__(
        self,
        stages: PipelineStage | Sequence[PipelineStage],
        n_microbatches: int,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        *,
        loss_reduction: str = "mean",
        target_chunk_spec: Any = None,
        output_merge_spec: Any = None,
        timeout: float | None = None,
        trace: bool | str = False,
        transport: Transport | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        self.stages = [stages] if isinstance(stages, PipelineStage) else list(stages)
        if not self.stages:
            raise ValueError("a schedule needs at least one stage")
        if not isinstance(n_microbatches, int) or n_microbatches < 1:
            raise ValueError(f"n_microbatches must be a positive int, got {n_microbatches!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.pipe = self.stages[0].pipe
        self.n_microbatches = n_microbatches
        self.loss_fn = loss_fn
        self.loss_reduction = loss_reduction
        self.target_chunk_spec = target_chunk_spec
        self.output_merge_spec = output_merge_spec
        self.transport = transport if transport is not None else DistTransport(self.stages[0].group, timeout)
        self.rank = self.transport.rank
        env_trace = os.environ.get("PIPPY_TRACE")
        self.trace_path: str | None = trace if isinstance(trace, str) else (env_trace or None)
        self.trace = bool(trace) or bool(env_trace)
        self.last_events: list[Event] = []
        self.last_timeline: Timeline | None = None
        self._executors: dict[int, Executor] = {}
        self.last_peak_live: dict[int, int] = {}
        self.last_peak_bytes: dict[int, int] = {}
        compute = schedule if schedule is not None else self._generate()
        compute = compute.with_deps(self.pipe.deps())
        self._check_placement(compute)
        self.schedule: Schedule | None = None
        if any(a.kind.is_compute and a.kind.value != "F" for acts in compute.actions for a in acts):
            validate(compute)
            self.schedule = lower(compute)
        self._eval_schedule = lower(gen.forward_only(compute.stage_to_rank, n_microbatches).with_deps(self.pipe.deps()))

    # ------------------------------------------------------------------ subclass hooks
    def _num_ranks(self) -> int:
        group_size = getattr(self.transport, "world_size", None)
        if group_size is not None:
            return int(group_size)
        return dist.get_world_size(self.stages[0].group)

    def _generate(self) -> Schedule:
        raise NotImplementedError

    def _check_placement(self, sch: Schedule) -> None:
        if sch.num_stages != self.pipe.num_stages:
            raise StageError(
                f"{self.name}: the schedule has {sch.num_stages} stages but the pipe has {self.pipe.num_stages}; "
                f"{self._placement_hint(sch)}"
            )
        want = sch.stages_of(self.rank)
        have = sorted(st.index for st in self.stages)
        if want != have:
            raise StageError(
                f"{self.name}: rank {self.rank} was given stages {have} but the schedule places stages {want} on it "
                f"(placement stage->rank {list(sch.stage_to_rank)}). {self._placement_hint(sch)}"
            )

    def _placement_hint(self, sch: Schedule) -> str:
        return (
            f"Build the pipe with {sch.num_stages} stages for {sch.num_ranks} ranks and pass each rank the stages "
            f"the schedule places on it (world size must equal the number of ranks the schedule uses)."
        )

    # ------------------------------------------------------------------ running
    def _holds(self, stage_index: int) -> bool:
        return any(st.index == stage_index for st in self.stages)

    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any], target: Any, training: bool) -> StepInputs:
        m = self.n_microbatches
        mbs = None
        if self._holds(0):
            if not args and not kwargs:
                raise StageError(
                    f"rank {self.rank} holds stage 0 but step()/eval() got no inputs; pass the batch here"
                )
            mbs = self.pipe.split_inputs(args, kwargs, m)
        elif args or kwargs:
            raise StageError(
                f"rank {self.rank} does not hold stage 0 but got inputs; call step()/eval() without the batch here"
            )
        targets = None
        if training and self._holds(self.pipe.num_stages - 1):
            if self.loss_fn is not None and target is None:
                raise StageError(
                    f"rank {self.rank}, stage {self.pipe.num_stages - 1} (last): loss_fn is set but target is None; "
                    "call step(..., target=y) on the rank holding the last stage"
                )
            if target is not None:
                targets = split_value(target, m, self.target_chunk_spec, what="target")
        scale = 1.0 / m if self.loss_reduction == "mean" else 1.0
        return StepInputs(mbs, targets, self.loss_fn, training, scale)

    def _run(self, sched: Schedule, inp: StepInputs) -> StepResult:
        if self.trace and isinstance(self.transport, DistTransport):
            dist.barrier(group=self.transport.group)  # a common origin for every rank's clock
        ex = self._executor(sched)
        try:
            gen_ = ex.run(inp)
            while True:
                next(gen_)
        except StopIteration as stop:
            res: StepResult = stop.value
        except BaseException:
            for st in self.stages:
                st.clear()
            raise
        return res

    def _executor(self, sched: Schedule) -> Executor:
        ex = self._executors.get(id(sched))
        if ex is None:
            ex = self._executors[id(sched)] = Executor(self.stages, sched, self.transport, trace=self.trace)
        return ex

    def _merge(self, res: StepResult) -> Any:
        if not self._holds(self.pipe.num_stages - 1) or not res.outputs:
            return None
        return merge_chunks(res.outputs, self.output_merge_spec)

    def step(
        self,
        *args: Any,
        target: Any = None,
        losses: list[Any] | None = None,
        return_outputs: bool = True,
        **kwargs: Any,
    ) -> Any:
        """One training step over the batch: forward and backward of every micro-batch.

        Gradients accumulate into each stage's parameters (call ``optimizer.zero_grad()`` between
        steps). Returns the merged output on the rank holding the last stage, else None;
        ``return_outputs=False`` saves the memory of keeping every micro-batch's output.
        """
        if self.schedule is None:
            raise StageError(f"{self.name} is a forward-only schedule; use eval(), or a training schedule for step()")
        inp = self._inputs(args, kwargs, target, True)
        inp.keep_outputs = return_outputs
        res = self._run(self.schedule, inp)
        return self._finish(res, losses)

    def _finish(self, res: StepResult, losses: list[Any] | None) -> Any:
        self.last_events = res.events
        if res.peak_live or not self.last_peak_live:  # eval() keeps the last training step's counts
            self.last_peak_live = res.peak_live
            self.last_peak_bytes = res.peak_bytes
        if self.trace and isinstance(self.transport, DistTransport):
            self._gather_trace(res.events)
        if losses is not None and self._holds(self.pipe.num_stages - 1):
            losses.extend(res.losses)
        return self._merge(res)

    def _gather_trace(self, events: list[Event]) -> None:
        """Collect every rank's events on rank 0; write the Chrome trace there when a path is set."""
        assert isinstance(self.transport, DistTransport)
        group = self.transport.group
        world = dist.get_world_size(group)
        gathered: list[Any] = [None] * world if self.rank == 0 else []
        dist.gather_object(events, gathered if self.rank == 0 else None, dst=dist.get_global_rank(group, 0), group=group)
        if self.rank != 0:
            return
        self.last_timeline = Timeline.from_events([e for evs in gathered for e in evs], world, name=self.name)
        if self.trace_path:
            from pippy.sim.render import write_chrome_trace

            write_chrome_trace(self.last_timeline, self.trace_path)

    @classmethod
    def placement(cls, num_ranks: int, stages_per_rank: int = 1) -> tuple[int, ...]:
        """Where this schedule puts stages: ``placement[s]`` is the rank of stage ``s``."""
        return loop_placement(num_ranks, stages_per_rank)

    def eval(self, *args: Any, **kwargs: Any) -> Any:
        """Forward only, keeping no autograd graph; merged output on the last stage's rank, else None."""
        with torch.no_grad():
            res = self._run(self._eval_schedule, self._inputs(args, kwargs, None, False))
        return self._finish(res, None)


class _SingleStage(PipelineSchedule):
    def _generate(self) -> Schedule:
        if len(self.stages) != 1:
            raise StageError(f"{type(self).__name__} runs one stage per rank; got {len(self.stages)} stages on rank {self.rank}")
        p = self._num_ranks()
        if p != self.pipe.num_stages:
            raise StageError(
                f"{type(self).__name__}: world size is {p} but the pipe has {self.pipe.num_stages} stages; a "
                f"one-stage-per-rank schedule needs exactly one rank per stage. Launch {self.pipe.num_stages} ranks "
                f"(torchrun --nproc-per-node {self.pipe.num_stages}) or split the model into {p} stages."
            )
        return self._make(p)

    def _make(self, p: int) -> Schedule:
        raise NotImplementedError


class _MultiStage(PipelineSchedule):
    multi_stage = True

    def _generate(self) -> Schedule:
        p = self._num_ranks()
        sch = self._make(p)
        if sch.num_stages != self.pipe.num_stages:
            raise StageError(
                f"{type(self).__name__}: with {p} ranks this schedule places {sch.num_stages} stages "
                f"(placement {list(sch.stage_to_rank)}) but the pipe has {self.pipe.num_stages}; split the model into "
                f"{sch.num_stages} stages"
            )
        return sch

    def _make(self, p: int) -> Schedule:
        raise NotImplementedError


class ScheduleGPipe(_SingleStage):
    """GPipe: all forwards, then all backwards. Memory: every micro-batch's activations at once."""

    name = "gpipe"

    def _make(self, p: int) -> Schedule:
        return gen.gpipe(p, self.n_microbatches)


class Schedule1F1B(_SingleStage):
    """1F1B: warm-up forwards, then alternate; at most p micro-batches of activations per rank."""

    name = "1f1b"

    def _make(self, p: int) -> Schedule:
        return gen.one_f_one_b(p, self.n_microbatches)


class ScheduleZBH1(_SingleStage):
    """Zero Bubble H1: 1F1B memory, weight-grad passes fill the bubble."""

    name = "zb_h1"

    def _make(self, p: int) -> Schedule:
        return gen.zb_h1(p, self.n_microbatches)


class ScheduleZBH2(_SingleStage):
    """Zero Bubble H2: more warm-up to remove the start bubble, at higher memory."""

    name = "zb_h2"

    def _make(self, p: int) -> Schedule:
        return gen.zb_h2(p, self.n_microbatches)


class ScheduleInterleaved1F1B(_MultiStage):
    """Interleaved 1F1B (Megatron): ``len(stages)`` stages per rank, looped placement."""

    name = "interleaved_1f1b"

    def _make(self, p: int) -> Schedule:
        return gen.interleaved_1f1b(p, self.n_microbatches, v=len(self.stages))


class ScheduleLoopedBFS(_MultiStage):
    """Looped BFS: breadth-first over local stages, looped placement."""

    name = "looped_bfs"

    def _make(self, p: int) -> Schedule:
        return gen.looped_bfs(p, self.n_microbatches, v=len(self.stages))


class _VShape(_MultiStage):
    def _gather_trace(self, events: list[Event]) -> None:
        """Collect every rank's events on rank 0; write the Chrome trace there when a path is set."""
        assert isinstance(self.transport, DistTransport)
        group = self.transport.group
        world = dist.get_world_size(group)
        gathered: list[Any] = [None] * world if self.rank == 0 else []
        dist.gather_object(events, gathered if self.rank == 0 else None, dst=dist.get_global_rank(group, 0), group=group)
        if self.rank != 0:
            return
        self.last_timeline = Timeline.from_events([e for evs in gathered for e in evs], world, name=self.name)
        if self.trace_path:
            from pippy.sim.render import write_chrome_trace

            write_chrome_trace(self.last_timeline, self.trace_path)

    @classmethod
    def placement(cls, num_ranks: int, stages_per_rank: int = 2) -> tuple[int, ...]:
        """Rank r holds stages r and 2p-1-r."""
        return v_placement(num_ranks)


class ScheduleZBV(_VShape):
    """ZB-V: two stages per rank in a V, split backward."""

    name = "zbv"

    def _make(self, p: int) -> Schedule:
        return gen.zbv(p, self.n_microbatches)


class ScheduleDualPipeV(_VShape):
    """DualPipeV: two stages per rank in a V, split backward."""

    name = "dualpipev"

    def _make(self, p: int) -> Schedule:
        return gen.dualpipev(p, self.n_microbatches)


class ScheduleFromCSV(PipelineSchedule):
    """Run a schedule read from CSV (compute-only or lowered); it must pass validation first.

        >>> # ScheduleFromCSV("my.csv", stages, loss_fn=F.mse_loss).step(x, target=y)
    """

    name = "csv"
    multi_stage = True

    def __init__(
        self,
        path: str,
        stages: PipelineStage | Sequence[PipelineStage],
        loss_fn: Callable[..., torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        from pippy.schedules.lower import from_csv

        sch = from_csv(path).compute_only()
        super().__init__(stages, sch.n_microbatches, loss_fn, schedule=sch, **kwargs)


def run_forward_pipeline(stage: PipelineStage, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward-only pipeline of ``pipe.num_chunks`` micro-batches, one stage per rank (``stage(x)``)."""
    sched = _stage_call_schedule(stage)
    return sched.eval(*args, **kwargs)


class _ForwardOnly(_SingleStage):
    name = "forward"

    def _make(self, p: int) -> Schedule:
        return gen.forward_only(tuple(range(p)), self.n_microbatches)


def _stage_call_schedule(stage: PipelineStage) -> PipelineSchedule:
    cached = getattr(stage, "_call_schedule", None)
    if cached is None:
        cached = _ForwardOnly(stage, stage.pipe.num_chunks)
        stage._call_schedule = cached  # type: ignore[attr-defined]
    return cached

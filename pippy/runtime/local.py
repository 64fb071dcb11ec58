"""Drive every rank of a pipeline inside one process (in-process transport), for tests and profiling.

The same schedule classes and executor run as under torchrun; only the transport differs.

    >>> # lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=F.mse_loss)
    >>> # out = lp.step(x, target=y); grads = lp.named_grads()
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pippy.frontend.pipe import Pipe
from pippy.runtime.comm import LocalTransport
from pippy.runtime.executor import StepResult
from pippy.runtime.schedule_base import PipelineSchedule
from pippy.runtime.stage import PipelineStage
from pippy.sim.timeline import Timeline

__all__ = ["LocalPipeline", "PipelineDeadlockError"]


class PipelineDeadlockError(RuntimeError):
    """Every rank is waiting and none can make progress."""


class LocalPipeline:
    """All ranks of a schedule in this process; ``step``/``eval`` take the full batch like the user API.

        >>> # LocalPipeline(pipe, ScheduleGPipe, num_ranks=2, n_microbatches=2).eval(x)
    """

    def __init__(
        self,
        pipe: Pipe,
        schedule_cls: type[PipelineSchedule],
        *,
        num_ranks: int,
        n_microbatches: int,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        device: torch.device | str = "cpu",
        **options: Any,
    ) -> None:
        sch = options.get("schedule")
        spr = max(1, pipe.num_stages // num_ranks)
        placement = sch.stage_to_rank if sch is not None else schedule_cls.placement(num_ranks, spr)
        if len(placement) != pipe.num_stages:
            raise ValueError(
                f"{schedule_cls.__name__} on {num_ranks} ranks places {len(placement)} stages, pipe has {pipe.num_stages}"
            )
        self.pipe = pipe
        self.stages = [PipelineStage(pipe, s, device) for s in range(pipe.num_stages)]
        self.transports = LocalTransport.world(num_ranks)
        self.schedules: list[PipelineSchedule] = []
        self.last_timeline: Timeline | None = None
        for r in range(num_ranks):
            mine = [self.stages[s] for s in range(pipe.num_stages) if placement[s] == r]
            self.schedules.append(schedule_cls(mine, n_microbatches, loss_fn, transport=self.transports[r], **options))

    def step(self, *args: Any, target: Any = None, losses: list[Any] | None = None, **kwargs: Any) -> Any:
        """A training step over all ranks; returns the merged output."""
        return self._drive(args, kwargs, target, losses, training=True)

    def eval(self, *args: Any, **kwargs: Any) -> Any:
        """Forward only over all ranks; returns the merged output."""
        with torch.no_grad():
            return self._drive(args, kwargs, None, None, training=False)

    def _drive(self, args: tuple, kwargs: dict, target: Any, losses: list[Any] | None, training: bool) -> Any:
        n = self.pipe.num_stages
        runs: list[tuple[PipelineSchedule, Iterator[None]]] = []
        origin = time.perf_counter()
        for sch in self.schedules:
            first, last = sch._holds(0), sch._holds(n - 1)
            inp = sch._inputs(args if first else (), kwargs if first else {}, target if last else None, training)
            plan = sch.schedule if training else sch._eval_schedule
            if plan is None:
                raise ValueError(f"{type(sch).__name__} has no training schedule; use eval()")
            runs.append((sch, sch._executor(plan).run(inp, origin)))
        results: dict[int, StepResult] = {}
        try:
            while len(results) < len(runs):
                progressed = False
                for r, (_sch, gen) in enumerate(runs):
                    if r in results:
                        continue
                    before = self.transports[r].waiting
                    try:
                        next(gen)
                    except StopIteration as stop:
                        results[r] = stop.value
                        progressed = True
                        continue
                    if self.transports[r].waiting != before or before is None:
                        progressed = True
                if not progressed:
                    waits = "; ".join(
                        f"rank {r} waits at {t.waiting.describe()}" for r, t in enumerate(self.transports) if t.waiting
                    )
                    raise PipelineDeadlockError(f"pipeline deadlock: no rank can progress. {waits}")
        except BaseException:
            for st in self.stages:
                st.clear()
            for t in self.transports:
                t.reset()
            raise
        if self.schedules[0].trace:
            events = [e for r in sorted(results) for e in results[r].events]
            self.last_timeline = Timeline.from_events(events, len(runs), name=self.schedules[0].name)
        out = None
        for r, (sch, _) in enumerate(runs):
            merged = sch._finish(results[r], losses)
            if sch._holds(n - 1):
                out = merged
        return out

    def named_grads(self) -> dict[str, torch.Tensor | None]:
        """Parameter gradients by original FQN (tied copies appear once, under each name)."""
        out: dict[str, torch.Tensor | None] = {}
        for st in self.stages:
            for name, p in st.submod.named_parameters(remove_duplicate=False):
                out.setdefault(name, p.grad)
        return out

    def zero_grad(self) -> None:
        """Clear every stage's parameter gradients."""
        for st in self.stages:
            st.submod.zero_grad(set_to_none=True)

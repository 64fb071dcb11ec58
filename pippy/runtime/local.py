"""Drive every rank of a pipeline inside one process (in-process transport), for tests and profiling.

The same schedule classes and executor run as under torchrun, through the same public
``begin`` / ``finish`` path; only the transport differs, and this driver advances every rank's
step in turn until all have ended.

    >>> import torch
    >>> from pippy import Schedule1F1B, SplitPoint, pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
    >>> pipe = pipeline(net, 4, (x,), split_spec={"1": SplitPoint.END})
    >>> lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=torch.nn.functional.mse_loss)
    >>> torch.allclose(lp.step(x, target=y), net(x))
    True
    >>> torch.nn.functional.mse_loss(net(x), y).backward()
    >>> all(torch.allclose(lp.named_grads()[n], p.grad, atol=1e-6) for n, p in net.named_parameters())
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from pippy.frontend.describe import describe_split_sites
from pippy.frontend.params import name_groups
from pippy.frontend.pipe import SplitPipe
from pippy.runtime.localcomm import LocalTransport
from pippy.runtime.schedule_base import PipelineSchedule, StepRun
from pippy.runtime.stepinputs import eval_options, refuse_no_grad
from pippy.runtime.userstage import PipelineStage
from pippy.sim.timeline import Timeline

__all__ = ["LocalPipeline", "PipelineDeadlockError"]


class PipelineDeadlockError(RuntimeError):
    """Every rank is waiting and none can make progress."""


class LocalPipeline:
    """All ranks of a schedule in this process; ``step``/``eval`` take the full batch like the user API (see the module)."""

    def __init__(
        self,
        pipe: SplitPipe,
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
                f"{schedule_cls.__name__} on {num_ranks} ranks places {len(placement)} stages, pipe has "
                f"{pipe.num_stages}; {describe_split_sites(getattr(pipe, 'split_sites', None), pipe.num_stages)}"
            )
        self.pipe = pipe
        self.stages = [PipelineStage(pipe, s, device) for s in range(pipe.num_stages)]
        self.transports = LocalTransport.world(num_ranks)
        self.schedules: list[PipelineSchedule] = []
        self.last_timeline: Timeline | None = None
        for r in range(num_ranks):
            mine = [self.stages[s] for s in range(pipe.num_stages) if placement[s] == r]
            self.schedules.append(schedule_cls(mine, n_microbatches, loss_fn, transport=self.transports[r], **options))

    def __repr__(self) -> str:
        """One line: the schedule class, ranks, stages, micro-batches and loss_fn.

            >>> from pippy import ScheduleGPipe, pipeline
            >>> pipe = pipeline(torch.nn.Linear(2, 1), 2, (torch.ones(4, 2),))
            >>> LocalPipeline(pipe, ScheduleGPipe, num_ranks=1, n_microbatches=2)
            LocalPipeline(ScheduleGPipe, 1 ranks, 1 stages, n_microbatches=2, loss_fn=None)
        """
        first = self.schedules[0]
        fn = first.loss_fn
        name = "None" if fn is None else getattr(fn, "__name__", type(fn).__name__)
        return (f"LocalPipeline({type(first).__name__}, {len(self.schedules)} ranks, {self.pipe.num_stages} stages, "
                f"n_microbatches={first.n_microbatches}, loss_fn={name})")

    def step(self, *args: Any, target: Any = None, losses: list[Any] | None = None,
             loss_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """A training step over all ranks; returns the merged output (forward only when nothing gives a loss)."""
        if not self.schedules[0].trains:
            self.schedules[0]._warn_once("forward", self.schedules[0].forward_only_notice())
            return self.eval(*args, **kwargs)
        refuse_no_grad(self.schedules[0].name)
        return self._drive(args, kwargs, target, losses, training=True, loss_kwargs=loss_kwargs)

    def eval(self, *args: Any, **kwargs: Any) -> Any:
        """Forward only over all ranks; returns the merged output (``target=`` / ``losses=`` / ``loss_kwargs=`` as in
        :meth:`pippy.runtime.schedule_base.PipelineSchedule.eval`)."""
        opts = eval_options(self.pipe, kwargs)
        self.schedules[0].note_unused_target(opts)
        with torch.no_grad():
            return self._drive(args, kwargs, opts.get("target"), opts.get("losses"), training=False,
                               loss_kwargs=opts.get("loss_kwargs"))

    def _drive(self, args: tuple, kwargs: dict, target: Any, losses: list[Any] | None, training: bool,
               loss_kwargs: dict[str, Any] | None = None) -> Any:
        n = self.pipe.num_stages
        self.schedules[-1]._check_losses(losses)  # before any rank starts: every rank counts the step or none
        origin = time.perf_counter()
        runs: list[StepRun] = []
        self._advancing: int | None = None
        try:
            for sch in self.schedules:
                first, last = sch.holds(0), sch.holds(n - 1)
                runs.append(sch.begin(args if first else (), kwargs if first else {}, target=target if last else None,
                                      training=training, origin=origin, loss_kwargs=loss_kwargs))
            self._advance_all(runs)
        except BaseException as exc:
            for t in self.transports:
                t.reset()  # nothing stays in flight, so the schedules stay usable
            low = min(sch._calls for sch in self.schedules)  # ranks refused before counting the step: count in step
            for sch in self.schedules:  # again (their messages' tags follow the count)
                sch._calls = low
            for r, run in enumerate(runs):  # a rank that had not begun holds nothing yet
                run.abort(exc, in_flight=False, raised_here=r == self._advancing)
            raise
        if self.schedules[0].trace:
            events = [e for run in runs if run.result is not None for e in run.result.events]
            self.last_timeline = Timeline.from_events(events, len(runs), name=self.schedules[0].name)
        out = None
        for sch, run in zip(self.schedules, runs):
            merged = sch.finish(run, losses)
            if sch.holds(n - 1):
                out = merged
        return out

    def _advance_all(self, runs: list[StepRun]) -> None:
        """Advance every rank's run in turn until all ended; a round where no rank moved is a deadlock."""
        while not all(run.done for run in runs):
            progressed = False
            for r, run in enumerate(runs):
                if run.done:
                    continue
                before = self.transports[r].waiting
                self._advancing = r
                if run.advance() or before is None or self.transports[r].waiting != before:
                    progressed = True
            if not progressed:
                self._advancing = None  # no rank raised: none is to blame
                waits = "; ".join(
                    f"rank {r} waits at {t.waiting.describe()}" for r, t in enumerate(self.transports) if t.waiting
                )
                raise PipelineDeadlockError(f"pipeline deadlock: no rank can progress. {waits}")

    def named_grads(self) -> dict[str, torch.Tensor | None]:
        """Parameter gradients by original FQN (tied copies appear once, under each name)."""
        out: dict[str, torch.Tensor | None] = {}
        for st in self.stages:
            for name, p in st.unwrapped.named_parameters(remove_duplicate=False):
                out.setdefault(name, p.grad)
        for group in name_groups(self.pipe):  # a tied tensor under every name, also those no stage reads it by
            have = next((n for n in group if n in out), None)
            if have is not None:
                for n in group:
                    out.setdefault(n, out[have])
        return out

    def zero_grad(self) -> None:
        """Clear every stage's parameter gradients."""
        for st in self.stages:
            st.submod.zero_grad(set_to_none=True)

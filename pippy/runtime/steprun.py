"""One rank's step in flight (:class:`StepRun`): advance it, run it to its end, or abort it cleanly on an error.

    >>> import torch
    >>> from pippy import Schedule1F1B, pipeline
    >>> from pippy.runtime.localcomm import LocalTransport
    >>> from pippy.runtime.stage import Stage
    >>> pipe = pipeline(torch.nn.Linear(2, 1), 2, (torch.ones(4, 2),))
    >>> sched = Schedule1F1B(Stage(pipe, 0), 2, torch.nn.functional.mse_loss, transport=LocalTransport.world(1)[0])
    >>> run = sched.begin((torch.ones(4, 2),), target=torch.zeros(4, 1))
    >>> run.done, len(run.run_blocking().losses), run.done
    (False, 2, True)
    >>> sched.finish(run).shape
    torch.Size([4, 1])
"""

from __future__ import annotations

import re
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from torch import fx

from pippy.frontend.batchwarnings import written_buffers
from pippy.runtime.comm import PipeAbortedError, PipeCommError
from pippy.runtime.ddp import DdpSync
from pippy.runtime.executor import Executor
from pippy.runtime.faults import notice_text
from pippy.runtime.guards import drop_unreduced_grads, is_fsdp
from pippy.runtime.stage import StageError
from pippy.runtime.stepstate import StepResult

if TYPE_CHECKING:
    from pippy.runtime.schedule_base import PipelineSchedule

__all__ = ["StepRun"]


class StepRun:
    """One step of one rank in flight: the executor's generator, then its result.

    Drive it with :meth:`advance` (one slice: until the next wait on an in-process transport)
    or :meth:`run_blocking`; on an error, :meth:`abort` cleans up. Made by
    :meth:`PipelineSchedule.begin`, ended by :meth:`PipelineSchedule.finish`.
    """

    def __init__(self, schedule: PipelineSchedule, executor: Executor, gen: Generator[None, None, StepResult],
                 *, training: bool = True, grads_were_none: bool = False) -> None:
        self.schedule = schedule
        self.executor = executor
        self._gen = gen
        self.result: StepResult | None = None
        self.training = training
        self._grads_were_none = grads_were_none  # training step that started from zero_grad(set_to_none=True)

    @property
    def done(self) -> bool:
        """True once the step ran to its end."""
        return self.result is not None

    def advance(self) -> bool:
        """Run until this rank waits (in-process transport) or ends; True when it ended.

        An error propagates as it is; the driver then calls :meth:`abort`.
        """
        try:
            next(self._gen)
        except StopIteration as stop:
            self.result = stop.value
            return True
        return False

    def run_blocking(self) -> StepResult:
        """Run to the end here (waits block on torch.distributed) and return the result; abort on an error."""
        try:
            while not self.advance():
                pass
        except BaseException as exc:
            self.abort(exc)
            raise
        assert self.result is not None
        return self.result

    def abort(self, exc: BaseException, *, in_flight: bool | None = None, raised_here: bool = True) -> None:
        """Clean up after ``exc``: drop the stages' micro-batch state, tell the other ranks, settle ``.grad``.

        The failure is posted for the other ranks (their waits stop at once, naming this rank and
        action). Parameter gradients: a step that began with every ``.grad`` None (after
        ``zero_grad()``) is rolled back to None; otherwise ``exc`` gets a note that ``.grad`` holds
        part of the failed step. When messages of the step may still be in flight (``in_flight``;
        default: the executor had posted one), or the other ranks were told of the failure, the
        schedule refuses further steps: a later step could receive old messages or read the old
        notice. ``raised_here=False`` (the in-process driver, for the ranks that did not raise)
        adds no note naming this rank.
        """
        self._gen.close()
        sch = self.schedule
        for st in sch.stages:
            st.clear()
        first = notice_text(str(exc), sch.rank)
        a = self.executor.current
        at = f"stage {a.stage}, action {a} (micro-batch {a.mb})" if a is not None else "between actions"
        told = sch.transport.fail(f"rank {sch.rank}, in its step {sch._calls}, {at}: {type(exc).__name__}: {first}")
        params = [p for st in sch.stages for p in st.parameters()] if self.training else []
        for st in sch.stages:  # the failed step may have turned FSDP2's or DDP's sync off, left unreduced gradients
            if is_fsdp(st.submod):
                drop_unreduced_grads(st.submod)
            elif (ddp := DdpSync.find(st.submod)) is not None:
                ddp.finish()
        if self._grads_were_none:
            for p in params:
                p.grad = None
            note = "pippy: every parameter .grad of this rank was reset to None, as before the failed step"
        else:
            note = ("pippy: parameter .grad on this rank holds part of the failed step's gradients; call "
                    "optimizer.zero_grad() before training on")
        notes = getattr(exc, "__notes__", [])
        if raised_here and hasattr(exc, "add_note") and not isinstance(exc, (PipeCommError, StageError)) and a is not None:
            exc.add_note(f"pippy: raised at rank {sch.rank}, {at}")  # a user's own error: say where it happened
        if hasattr(exc, "add_note") and any(p.requires_grad for p in params) and note not in notes:
            exc.add_note(note)
        if raised_here and "modified by an inplace operation" in str(exc) and hasattr(exc, "add_note") and \
                (inplace := _inplace_note(params, [st.submod for st in sch.stages])) not in notes:
            exc.add_note(inplace)
        behind = _behind(str(exc), sch._calls) if isinstance(exc, PipeAbortedError) else None
        if behind is not None and hasattr(exc, "add_note"):
            exc.add_note(
                f"pippy: rank {behind[0]} failed in its step {behind[1]}, which this rank had finished (this is its "
                f"step {sch._calls}, eval() calls counted): if an optimizer step ran after it, this rank's stages are "
                f"one update ahead of rank {behind[0]}'s. Restore every rank from the same checkpoint before training on"
            )
        where = getattr(sch.transport, "rank_note", "")  # a sub-group (dp x pp): its rank numbers are not global
        if where and hasattr(exc, "add_note") and where not in notes:
            exc.add_note(where)
        if told or (self.executor.started if in_flight is None else in_flight):
            sch._broken = f"{type(exc).__name__}: {notice_text(str(exc), sch.rank, 300)}"
            poison = getattr(sch.transport, "poison", None)
            if poison is not None:
                poison(f"rank {sch.rank}, {at}: {type(exc).__name__}: {first}")


def _inplace_note(params: list[Any], modules: list[Any]) -> str:
    """Why a pipelined backward may find a tensor changed in place that the model's one backward did not."""
    hooked = sum(1 for p in params if getattr(p, "_post_accumulate_grad_hooks", None))
    if hooked:
        return (f"pippy: {hooked} parameter(s) of this rank have post-accumulate-grad hooks. If one steps an "
                "optimizer (optimizer in backward), it changes the weights after a micro-batch's backward, while later "
                "micro-batches' backwards still need the values their forwards saw: a pipelined step runs one backward "
                "per micro-batch. Step the optimizer after schedule.step() instead; the weights may already hold "
                "updates, so restore them (e.g. from a checkpoint) before training on")
    buffers = sorted({f"{prefix}.{b}" if prefix else b for mod in modules for prefix, sub in mod.named_modules()
                      if isinstance(getattr(sub, "graph", None), fx.Graph) for b in written_buffers(sub)})
    told = (f"the model's forward writes the buffers {', '.join(buffers[:4])}{' ...' if len(buffers) > 4 else ''} in "
            "place, and a later micro-batch's forward overwrites what an earlier one's backward still needs (one "
            "forward over the batch wrote them once): read a copy where forward computes with them after writing "
            "(e.g. h * self.ema.clone()), or update them after the step; or " if buffers else "")
    return (f"pippy: a tensor a micro-batch's backward needs was changed in place after its forward: {told}a parameter "
            "or input was written during the step. A pipelined step runs one forward and backward per micro-batch, so "
            "change parameters only between step() calls")


def _behind(message: str, calls: int) -> tuple[int, int] | None:
    """``(rank, step)`` when the failure notice in ``message`` is of a step before this rank's ``calls``-th.

        >>> _behind("... That rank says: rank 0, in its step 5, stage 0, action 0B3 ...", 6)
        (0, 5)
        >>> _behind("... That rank says: rank 0, in its step 6, stage 0 ...", 6) is None
        True
    """
    found = re.search(r"That rank says: rank (\d+), in its step (\d+)", message)
    if found is None or int(found.group(2)) >= calls:
        return None
    return int(found.group(1)), int(found.group(2))


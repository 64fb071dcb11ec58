"""What a schedule settles with the other ranks: facts agreed before its first step, failures told to all.

A mixin of :class:`pippy.runtime.schedule_base.PipelineSchedule`. A rank that fails posts the
failure on the group's board (see :mod:`pippy.runtime.faults`), so the others' waits stop at
once instead of at their timeout; a schedule whose step failed, or whose group another
schedule's failed step left with receives in flight, refuses to run again.
"""

from __future__ import annotations

from typing import Any

from pippy.runtime.comm import DistTransport
from pippy.runtime.dpgroup import DataParallelMismatch, agree_stages_with_dp_peers
from pippy.runtime.faults import notice_text
from pippy.runtime.fingerprint import CODE_FACT, stage_fingerprints
from pippy.runtime.ranks import order_hash, schedule_facts, trace_barrier
from pippy.runtime.stage import Stage, StageError
from pippy.runtime.transport import Transport
from pippy.schedules.ir import Schedule

__all__ = ["PeerStanding"]


class PeerStanding:
    """Agreement with the other ranks and failures told to them (mixed into the schedule base, which sets these).

    The facts every rank compares before its first step (a rank that differs fails, naming the difference):

        >>> import torch
        >>> from pippy import ScheduleGPipe, pipeline
        >>> from pippy.runtime.localcomm import LocalTransport
        >>> pipe = pipeline(torch.nn.Linear(3, 1), 2, (torch.ones(4, 3),))
        >>> facts = ScheduleGPipe(pipe.build_stage(0, "cpu"), 2, transport=LocalTransport.world(1)[0]).facts()
        >>> facts["schedule"], facts["n_microbatches"], facts["stage_to_rank"], facts["stage_edges"]
        ('ScheduleGPipe', 2, [0], [[['float32[2, 3]'], ['float32[2, 1]']]])
    """

    name: str
    rank: int
    n_microbatches: int
    stages: list[Stage]
    transport: Transport
    schedule: Schedule | None
    pipe: Any
    _broken: str | None  # why this schedule refuses to run again, once a step of it failed
    _agreed: bool  # whether the ranks agreed on the facts since the order last changed
    _calls: int

    def _tell_others(self, where: str, exc: BaseException) -> None:
        """Post this rank's failure for the group (their waits stop now); later schedules send on a fresh group."""
        if self._post(f"{where}: {type(exc).__name__}: {notice_text(str(exc), self.rank)}"):
            # the other ranks may have posted receives
            self._broken = f"{type(exc).__name__}: {notice_text(str(exc), self.rank, 300)}"

    def _post(self, notice: str) -> bool:
        """Post ``notice`` on the failure board and, once posted, mark the group as a failed step's (as the ranks
        it stops do), so that every rank's next schedule sends on the same fresh group. Returns whether posted."""
        if not self.transport.fail(notice):
            return False
        poison = getattr(self.transport, "poison", None)
        if poison is not None:
            poison(notice)
        return True

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise StageError(
                f"rank {self.rank}: an earlier step failed here ({self._broken}); messages of that step may still be "
                "in flight, so this schedule refuses to run again. Fix the cause, then build a new schedule on every "
                "rank (the same process group is fine: its messages stay apart from the old ones)."
            )

    def _load_changed_order(self) -> None:
        """Run a ``pipeline_order`` filled in rank by rank and not loaded yet (see ``runtime/peer_attrs``); here none."""

    def _refuse_if_stale(self) -> None:
        """Refuse to run when another schedule failed on the group this one sends on, after this one was built."""
        stale = getattr(self.transport, "stale", None)
        why = stale() if stale is not None else None
        if why is None:
            return
        mine = sorted(st.index for st in self.stages)
        exc = StageError(
            f"rank {self.rank}, stages {mine}, action step start: another schedule on this process group failed a "
            f"step after {type(self).__name__} was built here ({notice_text(why, None, 300)}). Its abandoned receives stay on the group "
            "and could take this schedule's messages, so this schedule refuses to run. Build this schedule anew on "
            "every rank too, as the failed one (a new schedule sends on a fresh group of the same ranks)."
        )
        self._tell_others(f"rank {self.rank}, stages {mine}, before its step", exc)
        self._broken = self._broken or "another schedule on its process group failed"
        raise exc

    def facts(self) -> dict[str, Any]:
        """What every rank must agree on before the first step: :func:`pippy.runtime.ranks.schedule_facts`, and
        the stages' code (:func:`pippy.runtime.fingerprint.stage_fingerprints`: a model differing between ranks)."""
        return {**schedule_facts(self), CODE_FACT: stage_fingerprints(self.pipe)}

    def _agree(self) -> None:
        mine = sorted(st.index for st in self.stages)
        where = f"rank {self.rank} (stages {mine}), before its {'first' if self._calls <= 1 else 'next'} step"
        try:
            self.transport.agree(self.facts(), where)
        except RuntimeError as exc:
            text = notice_text(str(exc), self.rank)
            self._post(text if text.startswith(where) else f"{where}: {text}")  # said once, not twice
            raise StageError(str(exc)) from None
        if isinstance(self.transport, DistTransport):  # and the stages' data-parallel peers, if they have any
            facts: dict[str, Any] = {"schedule": self.name, "n_microbatches": self.n_microbatches, "stages": mine}
            if self.schedule is not None:  # the order depends on costs= (W's placed, B's split): same everywhere
                facts["action order (set by costs=, which must be the same on every rank)"] = order_hash(self.schedule)
            try:
                agree_stages_with_dp_peers([st.submod for st in self.stages], facts, self.name, self.transport.timeout)
            except DataParallelMismatch as exc:
                self._post(f"rank {self.rank} (stages {mine}): {notice_text(str(exc), self.rank)}")
                raise StageError(str(exc)) from None
        self._agreed = True

    def _trace_barrier(self) -> None:
        """Wait for every rank before a traced step, so that their traces share one origin."""
        where = f"rank {self.rank}, stages {sorted(st.index for st in self.stages)}, action trace barrier " \
                f"(before step {self._calls}, micro-batch 0)"
        try:
            trace_barrier(self.transport, where)
        except Exception as exc:
            self._tell_others(where, exc)
            raise

"""Schedule classes under PyTorch pipelining's names, and ``get_schedule_class`` to find any schedule by name.

Code written for PyTorch's pipelining package (torchtitan among it) picks its schedule class
by name and constructs it the same way for every class; these names make it run here::

    cls = get_schedule_class("InterleavedZeroBubble")
    sched = cls(stages if issubclass(cls, PipelineScheduleMulti) else stages[0], 8, loss_fn=loss_fn)

    >>> get_schedule_class("1f1b").__name__, get_schedule_class("ZBVZeroBubble").__name__
    ('Schedule1F1B', 'ScheduleZBVZeroBubble')
    >>> get_schedule_class("zb_h1") is get_schedule_class("ScheduleZBH1")
    True
"""

from __future__ import annotations

from typing import Any

from pippy.runtime.api import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleLoopedBFS,
    ScheduleSynthesized,
    ScheduleZBH1,
    ScheduleZBH2,
    ScheduleZBV,
)
from pippy.schedules import generators as gen
from pippy.schedules.ir import Schedule, loop_placement

__all__ = [
    "ScheduleInterleavedZeroBubble",
    "ScheduleZBVZeroBubble",
    "_PipelineScheduleRuntime",
    "_ScheduleForwardOnly",
    "get_schedule_class",
]


class ScheduleInterleavedZeroBubble(PipelineScheduleMulti):
    """Interleaved zero bubble: this rank's stages in a list, stage ``s`` on rank ``s % p`` (one or more per rank).

    The order of :func:`pippy.schedules.generators.interleaved_zb`, which with several stages per
    rank is what ``ScheduleZBH1`` runs, and with one is ZB-H1's.
    """

    name = "interleaved_zb"

    @classmethod
    def placement(cls, num_ranks: int, stages_per_rank: int = 2) -> tuple[int, ...]:
        """Stage ``s`` on rank ``s % num_ranks``."""
        return loop_placement(num_ranks, stages_per_rank)

    def _make(self, p: int) -> Schedule:
        return gen.interleaved_zb(p, self.n_microbatches, v=len(self.stages))


class ScheduleZBVZeroBubble(ScheduleZBV):
    """ZB-V under PyTorch pipelining's name: rank ``r`` passes ``[stage_r, stage_(2p-1-r)]``."""


class _ScheduleForwardOnly(PipelineScheduleSingle):
    """Forward only, one stage per rank: ``step(x)`` runs the forwards and returns the merged output (last rank)."""

    name = "forward"

    def _make(self, p: int) -> Schedule:
        return gen.forward_only(tuple(range(p)), self.n_microbatches)

    def step(self, *args: Any, target: Any = None, losses: list[Any] | None = None, **kwargs: Any) -> Any:
        """The forward pipeline over this batch (no losses, no gradients); the last rank gets the output."""
        return self.eval(*args, **kwargs)


class _PipelineScheduleRuntime(PipelineScheduleMulti):
    """A schedule that runs only the order given to ``_load_csv`` / ``_load_actions`` (PyTorch pipelining's name)."""

    def _load_csv(self, filename: Any, format: str = "compute_comms") -> None:  # its default format
        super()._load_csv(filename, format)


_CLASSES: tuple[type, ...] = (
    ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B, ScheduleLoopedBFS, ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble, ScheduleDualPipeV, ScheduleZBH1, ScheduleZBH2, ScheduleZBV, ScheduleSynthesized,
    PipelineScheduleSingle, PipelineScheduleMulti, _PipelineScheduleRuntime,
)


def _keys(cls: type) -> set[str]:
    name = cls.__name__.lstrip("_")
    short = name.removeprefix("Schedule").removeprefix("PipelineSchedule") if name.startswith("Schedule") else name
    keys = {name, short, getattr(cls, "name", "") if "name" in vars(cls) else ""}
    return {k.lower().replace("_", "") for k in keys if k}


def get_schedule_class(schedule_name: str) -> type:
    """The schedule class called ``schedule_name``, case and underscores ignored: PyTorch pipelining's names
    (``"1F1B"``, ``"Interleaved1F1B"``, ``"GPipe"``, ``"LoopedBFS"``, ``"InterleavedZeroBubble"``,
    ``"ZBVZeroBubble"``, ``"DualPipeV"``, ``"PipelineScheduleSingle"``, ``"PipelineScheduleMulti"``),
    pippy's (``"ZBH1"``, ``"ZBH2"``, ``"ZBV"``, ``"Synthesized"``, or the CLI's ``"zb_h1"``), or a
    class name (``"ScheduleGPipe"``).

        >>> get_schedule_class("interleaved1f1b").__name__
        'ScheduleInterleaved1F1B'
        >>> get_schedule_class("ZeroBubble")
        Traceback (most recent call last):
        ...
        ValueError: unknown schedule name 'ZeroBubble'; known: 1F1B, DualPipeV, GPipe, Interleaved1F1B, ...
    """
    if not isinstance(schedule_name, str):
        raise TypeError(f"get_schedule_class expects a schedule name (str), got {type(schedule_name).__name__}")
    key = schedule_name.strip().lower().replace("_", "")
    for cls in _CLASSES:
        if key in _keys(cls):
            return cls
    known = sorted({cls.__name__.lstrip("_").removeprefix("Schedule") for cls in _CLASSES})
    raise ValueError(f"unknown schedule name {schedule_name!r}; known: {', '.join(known)} (case and underscores "
                     "ignored; the 'Schedule' prefix may be given)")

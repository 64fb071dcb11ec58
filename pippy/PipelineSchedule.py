"""PiPPy's module path for the schedules: ``from pippy.PipelineSchedule import ScheduleGPipe`` (same classes as ``pippy``).

    >>> import pippy
    >>> from pippy.PipelineSchedule import Schedule1F1B, ScheduleGPipe
    >>> ScheduleGPipe is pippy.ScheduleGPipe and Schedule1F1B is pippy.Schedule1F1B
    True
"""

from pippy.runtime.api import (
    PipelineSchedule,
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleLoopedBFS,
    ScheduleZBH1,
    ScheduleZBH2,
    ScheduleZBV,
)
from pippy.runtime.peer_attrs import OVERLAP_F_B
from pippy.runtime.schedule_base import PipelineSchedule as _PipelineSchedule
from pippy.runtime.schedule_names import (
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
    _PipelineScheduleRuntime,
    _ScheduleForwardOnly,
    get_schedule_class,
)

__all__ = [
    "OVERLAP_F_B",
    "PipelineSchedule",
    "PipelineScheduleMulti",
    "PipelineScheduleSingle",
    "Schedule1F1B",
    "ScheduleDualPipeV",
    "ScheduleGPipe",
    "ScheduleInterleaved1F1B",
    "ScheduleInterleavedZeroBubble",
    "ScheduleLoopedBFS",
    "ScheduleZBH1",
    "ScheduleZBH2",
    "ScheduleZBV",
    "ScheduleZBVZeroBubble",
    "_PipelineSchedule",
    "_PipelineScheduleRuntime",
    "_ScheduleForwardOnly",
    "get_schedule_class",
]

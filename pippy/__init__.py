"""pippy: pipeline parallelism for PyTorch — trace an unchanged nn.Module, split it into stages, run any schedule.

    >>> from pippy import pipeline, annotate_split_points, pipe_split, Pipe, SplitPoint
"""

from pippy.frontend.pipe import Pipe, pipeline
from pippy.frontend.trace import PipeTraceError, SplitPoint, annotate_split_points, pipe_split
from pippy.microbatch import Replicate, Sum, TensorChunkSpec
from pippy.runtime.api import (
    PipelineSchedule,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleFromCSV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleLoopedBFS,
    ScheduleZBH1,
    ScheduleZBH2,
    ScheduleZBV,
)
from pippy.runtime.comm import PipeCommError, PipeTimeoutError
from pippy.runtime.stage import PipelineStage, StageError

__all__ = [
    "Pipe",
    "PipeCommError",
    "PipeTimeoutError",
    "PipeTraceError",
    "PipelineSchedule",
    "PipelineStage",
    "Replicate",
    "Schedule1F1B",
    "ScheduleDualPipeV",
    "ScheduleFromCSV",
    "ScheduleGPipe",
    "ScheduleInterleaved1F1B",
    "ScheduleLoopedBFS",
    "ScheduleZBH1",
    "ScheduleZBH2",
    "ScheduleZBV",
    "SplitPoint",
    "StageError",
    "Sum",
    "TensorChunkSpec",
    "annotate_split_points",
    "pipe_split",
    "pipeline",
]

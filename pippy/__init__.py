"""pippy: pipeline parallelism for PyTorch — trace an unchanged nn.Module, split it into stages, run any schedule.

    >>> from pippy import pipeline, annotate_split_points, pipe_split, Pipe, SplitPoint

The public names are imported lazily (PEP 562), so ``python -m pippy --help`` and the schedule
and simulator modules start without importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pippy.frontend.costsplit import autosplit, graphsplit
    from pippy.frontend.genpipe import GenerationError
    from pippy.frontend.policies import split_by_names, split_equal_layers, split_equal_params
    from pippy.frontend.trace import PipeTraceError, SplitPoint, annotate_split_points, pipe_split
    from pippy.ManualPipelineStage import ManualPipelineStage
    from pippy.microbatch import Replicate, Sum, TensorChunkSpec
    from pippy.ModelSplit import split_by_graph, split_into_equal_size, split_on_size_threshold
    from pippy.pipe import ArgsChunkSpec, KwargsChunkSpec, Pipe, pipeline
    from pippy.pipeinfo import PipeInfo, build_stage
    from pippy.runtime.api import (
        PipelineSchedule,
        PipelineScheduleMulti,
        PipelineScheduleSingle,
        Schedule1F1B,
        ScheduleDualPipeV,
        ScheduleFromCSV,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
        ScheduleLoopedBFS,
        ScheduleSynthesized,
        ScheduleZBH1,
        ScheduleZBH2,
        ScheduleZBV,
    )
    from pippy.runtime.clip import clip_grad_norm_, grad_norm
    from pippy.runtime.comm import PipeCommError, PipeTimeoutError
    from pippy.runtime.generate import GenerationPipe, GenerationStage, generate, pipeline_for_generation
    from pippy.runtime.gradscaler import PipelineGradScaler
    from pippy.runtime.schedule_names import (
        ScheduleInterleavedZeroBubble,
        ScheduleZBVZeroBubble,
        _ScheduleForwardOnly,
        get_schedule_class,
    )
    from pippy.runtime.stage import PipeliningShapeError, StageError
    from pippy.runtime.userstage import PipelineStage
    from pippy.sim.cost import CostModel, StageCost
    from pippy.sim.profile import profile, profile_ranks
    from pippy.sim.simulate import simulate
    from pippy.sim.synthesize import synthesize

__all__ = [
    "ArgsChunkSpec",
    "CostModel",
    "GenerationError",
    "GenerationPipe",
    "GenerationStage",
    "KwargsChunkSpec",
    "ManualPipelineStage",
    "Pipe",
    "PipeCommError",
    "PipeInfo",
    "PipeTimeoutError",
    "PipeTraceError",
    "PipelineGradScaler",
    "PipelineSchedule",
    "PipelineScheduleMulti",
    "PipelineScheduleSingle",
    "PipelineStage",
    "PipeliningShapeError",
    "Replicate",
    "Schedule1F1B",
    "ScheduleDualPipeV",
    "ScheduleFromCSV",
    "ScheduleGPipe",
    "ScheduleInterleaved1F1B",
    "ScheduleInterleavedZeroBubble",
    "ScheduleLoopedBFS",
    "ScheduleSynthesized",
    "ScheduleZBH1",
    "ScheduleZBH2",
    "ScheduleZBV",
    "ScheduleZBVZeroBubble",
    "SplitPoint",
    "StageCost",
    "StageError",
    "Sum",
    "TensorChunkSpec",
    "_ScheduleForwardOnly",
    "annotate_split_points",
    "autosplit",
    "build_stage",
    "clip_grad_norm_",
    "generate",
    "get_schedule_class",
    "grad_norm",
    "graphsplit",
    "pipe_split",
    "pipeline",
    "pipeline_for_generation",
    "profile",
    "profile_ranks",
    "simulate",
    "split_by_graph",
    "split_by_names",
    "split_equal_layers",
    "split_equal_params",
    "split_into_equal_size",
    "split_on_size_threshold",
    "synthesize",
]

# public name -> module that defines it
_WHERE = {
    "Pipe": "pippy.pipe",
    "pipeline": "pippy.pipe",
    "ArgsChunkSpec": "pippy.pipe",
    "KwargsChunkSpec": "pippy.pipe",
    "PipeInfo": "pippy.pipeinfo",
    "build_stage": "pippy.pipeinfo",
    "ManualPipelineStage": "pippy.ManualPipelineStage",
    **{n: "pippy.ModelSplit" for n in ("split_by_graph", "split_into_equal_size", "split_on_size_threshold")},
    **{n: "pippy.frontend.costsplit" for n in ("autosplit", "graphsplit")},
    **{n: "pippy.frontend.policies" for n in ("split_by_names", "split_equal_layers", "split_equal_params")},
    "PipeTraceError": "pippy.frontend.trace",
    "GenerationError": "pippy.frontend.genpipe",
    **{n: "pippy.runtime.generate" for n in ("GenerationPipe", "GenerationStage", "generate", "pipeline_for_generation")},
    "SplitPoint": "pippy.frontend.trace",
    "annotate_split_points": "pippy.frontend.trace",
    "pipe_split": "pippy.frontend.trace",
    "Replicate": "pippy.microbatch",
    "Sum": "pippy.microbatch",
    "TensorChunkSpec": "pippy.microbatch",
    "clip_grad_norm_": "pippy.runtime.clip",
    "grad_norm": "pippy.runtime.clip",
    "PipelineGradScaler": "pippy.runtime.gradscaler",
    "PipeCommError": "pippy.runtime.comm",
    "PipeTimeoutError": "pippy.runtime.comm",
    "PipelineStage": "pippy.runtime.userstage",
    "StageError": "pippy.runtime.stage",
    "PipeliningShapeError": "pippy.runtime.stage",
    "CostModel": "pippy.sim.cost",
    "StageCost": "pippy.sim.cost",
    "profile": "pippy.sim.profile",
    "profile_ranks": "pippy.sim.profile",
    "simulate": "pippy.sim.simulate",
    "synthesize": "pippy.sim.synthesize",
    **{n: "pippy.runtime.api" for n in __all__ if n.startswith(("Schedule", "PipelineSchedule"))},
    **{n: "pippy.runtime.schedule_names" for n in ("ScheduleInterleavedZeroBubble", "ScheduleZBVZeroBubble",
                                                   "_ScheduleForwardOnly", "get_schedule_class")},
}


_SUBMODULES = frozenset({
    "ManualPipelineStage", "ModelSplit", "PipelineSchedule", "PipelineStage", "_IR", "_PipelineStage", "_backward",
    "checkpoint", "cli", "frontend", "hf", "microbatch", "pipe", "pipeinfo", "recompute", "runtime", "schedules",
    "sim",
})


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562) and cache it in the package namespace."""
    mod = _WHERE.get(name)
    if mod is None:
        if name in _SUBMODULES:  # ``import pippy; pippy.microbatch`` as PiPPy scripts write it
            value = importlib.import_module(f"pippy.{name}")
            globals()[name] = value
            return value
        raise AttributeError(f"module 'pippy' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Module attributes plus the lazily imported public names."""
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module: a public class keeps its name when a same-named submodule is imported.

    ``pippy.PipelineStage`` and ``pippy.ManualPipelineStage`` are classes and also module paths
    (``from pippy.PipelineStage import PipelineStage``); importing the submodule must not replace
    the class on the package, as Python's import system would.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

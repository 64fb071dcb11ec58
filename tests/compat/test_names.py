"""Every public name and module path a PiPPy script imports exists in pippy and is the working object."""

from __future__ import annotations

import importlib

import pytest

import pippy

PIPPY_ALL = [
    "Pipe", "PipelineStage", "pipe_split", "SplitPoint", "annotate_split_points", "split_into_equal_size",
    "split_on_size_threshold", "split_by_graph", "pipeline", "Schedule1F1B", "ScheduleGPipe",
    "ScheduleInterleaved1F1B", "ScheduleLoopedBFS", "ManualPipelineStage", "ArgsChunkSpec", "KwargsChunkSpec",
]

MODULE_NAMES = {
    "pippy.PipelineSchedule": ["ScheduleGPipe", "Schedule1F1B", "ScheduleInterleaved1F1B", "ScheduleLoopedBFS",
                               "PipelineScheduleSingle", "PipelineScheduleMulti"],
    "pippy.PipelineStage": ["PipelineStage"],
    "pippy._PipelineStage": ["PipelineStage", "PipelineStageBase", "_PipelineStage"],
    "pippy.ManualPipelineStage": ["ManualPipelineStage", "create_empty_tensors", "create_metadata_tensor",
                                  "extract_metadata_from_tensor", "get_stage_shapes", "validate_stage_shapes"],
    "pippy.ModelSplit": ["split_into_equal_size", "split_on_size_threshold", "split_by_graph", "aten_pipe_split_alias"],
    "pippy._IR": ["Pipe", "pipeline", "pipe_split", "SplitPoint", "annotate_split_points", "ArgsChunkSpec",
                  "KwargsChunkSpec", "MultiUseParameterConfig", "PipeSplitWrapper", "PipeSequential", "LossWrapper",
                  "TrivialLossWrapper", "_null_coalesce_accumulate", "aten_pipe_split_alias"],
    "pippy.IR": ["Pipe", "pipeline", "pipe_split", "SplitPoint", "annotate_split_points", "PipeSplitWrapper",
                 "LossWrapper", "TrivialLossWrapper", "MultiUseParameterConfig"],  # PiPPy's older path
    "pippy._backward": ["stage_backward", "_null_coalesce_accumulate"],
    "pippy.microbatch": ["split_args_kwargs_into_chunks", "merge_chunks", "TensorChunkSpec", "_Replicate",
                         "_debug_mask_minibatches", "sum_reducer", "_CustomReducer"],
}


@pytest.mark.parametrize("name", PIPPY_ALL)
def test_top_level_name(name: str) -> None:
    assert name in pippy.__all__
    assert getattr(pippy, name) is not None
    exec(f"from pippy import {name}", {})


@pytest.mark.parametrize("module", sorted(MODULE_NAMES))
def test_module_path(module: str) -> None:
    mod = importlib.import_module(module)
    missing = [n for n in MODULE_NAMES[module] if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"


def test_same_objects_under_every_path() -> None:
    from pippy._IR import Pipe, pipeline
    from pippy._PipelineStage import PipelineStage as PS2
    from pippy.PipelineSchedule import ScheduleGPipe
    from pippy.PipelineStage import PipelineStage

    assert ScheduleGPipe is pippy.ScheduleGPipe and PipelineStage is pippy.PipelineStage is PS2
    assert Pipe is pippy.Pipe and pipeline is pippy.pipeline


def test_submodules_as_attributes() -> None:
    """``import pippy`` then ``pippy.microbatch._debug_mask_minibatches = True``, as PiPPy's tests write it."""
    assert pippy.microbatch._debug_mask_minibatches is False
    assert pippy.ModelSplit.split_by_graph is pippy.split_by_graph
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pippy.nope  # noqa: B018


@pytest.mark.parametrize("path", ["pippy.ModelSplit", "pippy._IR", "pippy.PipelineSchedule"])
def test_pippy_module_paths_import_first_in_a_fresh_interpreter(path: str) -> None:
    """``from pippy.ModelSplit import ...`` as a script's first pippy import (the op it names must exist by then)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"import {path}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

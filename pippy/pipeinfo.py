"""``pipe.info()`` and the package's ``build_stage``, which takes pippy's form and PyTorch pipelining's (module, index, info).

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> pipe = pipeline(net, 2, (torch.ones(4, 4),), split_spec={"0": SplitPoint.END})
    >>> build_stage(pipe, 1, "cpu"), build_stage(pipe.get_stage_module(0), 0, pipe.info(), "cpu")
    (PipelineStage(index=1, of=2, device=cpu), PipelineStage(index=0, of=2, device=cpu))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import fx, nn

from pippy.frontend.materialize import Checkpoint
from pippy.frontend.params import is_lifted_constant
from pippy.frontend.pipe import SplitPipe
from pippy.runtime.build import build_stage as build_pipe_stage
from pippy.runtime.userstage import PipelineStage

__all__ = ["PipeInfo", "build_stage", "pipe_info"]


@dataclass(frozen=True)
class PipeInfo:
    """What a stage needs to know of its pipe (PyTorch pipelining's ``PipeInfo``), from ``pipe.info()``.

        >>> from pippy import pipeline
        >>> info = pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),)).info()
        >>> info.num_stages, info.has_loss_and_backward, type(info.graph).__name__
        (1, False, 'Graph')
    """

    graph: fx.Graph
    """The whole pipe's graph: it calls the stage modules ``submod_<i>`` in order."""
    num_stages: int
    """How many stages the pipe has."""
    has_loss_and_backward: bool
    """Always False: pippy never folds a loss and its backward into the pipe (schedules take ``loss_fn``)."""
    pipe: SplitPipe | None = field(default=None, repr=False, compare=False)
    """The pipe itself: :func:`build_stage` builds the stage from it (None in one made by hand, as PyTorch's
    ``PipeInfo(graph, num_stages, has_loss_and_backward)``, which cannot build a stage)."""


def pipe_info(pipe: SplitPipe) -> PipeInfo:
    """``pipe.info()``: the pipe's graph, stage count and loss flag, holding the pipe for :func:`build_stage`.

        >>> from pippy import pipeline
        >>> pipe_info(pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),))).num_stages
        1
    """
    from pippy.frontend.root import root_module

    return PipeInfo(root_module(pipe).graph, pipe.num_stages, bool(getattr(pipe, "has_loss_and_backward", False)), pipe)


@overload
def build_stage(pipe: SplitPipe, i: int, device: torch.device | str, group: Any = None, *,
                checkpoint: Checkpoint | None = None, init_fn: Callable[[nn.Module], None] | None = None,
                recompute: bool | Literal["full", "pointwise"] = False, pp_dim: str = "pp") -> PipelineStage: ...


@overload
def build_stage(stage_module: nn.Module, stage_index: int, pipe_info: PipeInfo, device: torch.device | str,
                group: Any = None) -> PipelineStage: ...


def build_stage(*args: Any, **kwargs: Any) -> PipelineStage:
    """Build this rank's stage: ``build_stage(pipe, index, device, group=None, ...)`` (pippy's form, see
    :func:`pippy.runtime.build.build_stage`) or ``build_stage(stage_module, index, pipe.info(), device, group=None)``
    (PyTorch pipelining's form).

    In the second form the stage is the one the pipe builds for ``index``; ``stage_module`` says which
    weights it starts with. The pipe's own stage module (``pipe.get_stage_module(index)``) is copied as
    ``pipe.build_stage`` copies it; another module (a copy with other weights) must have the stage's
    parameter and buffer names and shapes, and its values are loaded into the stage. Either way the
    stage trains its own tensors: build the optimizer from ``stage.submod.parameters()``.

        >>> from pippy import pipeline
        >>> import copy
        >>> pipe = pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),))
        >>> other = copy.deepcopy(pipe.get_stage_module(0))
        >>> _ = other.weight.data.fill_(3.0)
        >>> build_stage(other, 0, pipe.info(), "cpu").submod.weight[0, 0].item()
        3.0
    """
    first = args[0] if args else kwargs.get("pipe", kwargs.get("stage_module"))
    if isinstance(first, SplitPipe) or "pipe" in kwargs:
        return build_pipe_stage(*args, **kwargs)
    return _from_module(*args, **kwargs)


def _from_module(stage_module: nn.Module, stage_index: int, pipe_info: PipeInfo, device: torch.device | str,
                 group: Any = None) -> PipelineStage:
    """PyTorch pipelining's form of :func:`build_stage`."""
    if not isinstance(pipe_info, PipeInfo):
        raise TypeError(
            f"build_stage(stage_module, {stage_index!r}, pipe_info, device): expected pipe_info from pipe.info() of a "
            f"pippy pipe, got {type(pipe_info).__name__}. Pass pipe.info(), or use pippy's form "
            "build_stage(pipe, stage_index, device, group)"
        )
    if not isinstance(stage_module, nn.Module):
        raise TypeError(
            f"build_stage: expected a pipe or a stage module first, got {type(stage_module).__name__}. Pass "
            f"pipe.get_stage_module({stage_index!r}) with pipe.info(), or the pipe itself: build_stage(pipe, index, "
            "device)"
        )
    pipe = pipe_info.pipe
    if pipe is None:
        raise TypeError(
            f"build_stage(stage_module, {stage_index!r}, pipe_info, device): this PipeInfo was made by hand and holds "
            "no pipe; expected pipe.info() of the pipe that stage_module comes from. Pass pipe.info(), or use pippy's "
            "form build_stage(pipe, stage_index, device, group)"
        )
    pipe._check_index(stage_index)
    stage = build_pipe_stage(pipe, stage_index, device, group)
    if stage_module is pipe.stage_infos[stage_index].module:  # the pipe's own: the stage is a copy of it already
        return stage
    given = {k: v for k, v in stage_module.state_dict().items() if not is_lifted_constant(k)}
    want = stage.state_dict()
    missing, unexpected = sorted(set(want) - set(given)), sorted(set(given) - set(want))
    shapes = sorted(k for k in set(want) & set(given) if tuple(given[k].shape) != tuple(want[k].shape))
    if missing or unexpected or shapes:
        def show(keys: list[str]) -> str:
            return f"{keys[:6]}{' ...' if len(keys) > 6 else ''}"
        sizes = [f"{k}: {tuple(given[k].shape)} (stage: {tuple(want[k].shape)})" for k in shapes[:6]]
        raise ValueError(
            f"build_stage({type(stage_module).__name__}, {stage_index}, pipe.info(), ...): the module's parameters "
            f"and buffers do not match stage {stage_index} of the pipe: expected the keys {show(sorted(want))}; "
            f"missing {show(missing)}, unexpected {show(unexpected)}, other shapes {sizes}. Pass "
            f"pipe.get_stage_module({stage_index}) (or a copy of it), the module of this stage index"
        )
    with torch.no_grad():
        stage.load_state_dict(given)
        for name, buf in stage_module.named_buffers():  # non-persistent ones (RoPE's inv_freq) are no state_dict's
            mine = _buffer(stage.unwrapped, name)
            if name not in given and mine is not None and mine.shape == buf.shape and not is_lifted_constant(name):
                mine.copy_(buf)
    return stage


def _buffer(module: nn.Module, name: str) -> torch.Tensor | None:
    try:
        return module.get_buffer(name)
    except AttributeError:
        return None

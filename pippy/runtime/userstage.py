"""The stage users build: ``PipelineStage(pipe, rank, device)``, or ``PipelineStage(module, index, num_stages, device)``.

Calling a traced pipe's stage runs a forward-only pipeline (``stage(x)`` on the first rank,
``stage()`` elsewhere); PyTorch pipelining's module form builds a hand-cut stage
(:func:`pippy.runtime.manual.module_stage`), which ``isinstance(x, PipelineStage)`` also accepts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pippy.frontend.pipe import SplitPipe
from pippy.runtime.guards import check_device, watch_traced_parameters
from pippy.runtime.manual import ManualStage, module_stage
from pippy.runtime.schedule_base import PipelineSchedule
from pippy.runtime.schedule_names import _ScheduleForwardOnly
from pippy.runtime.stage import Stage

__all__ = ["PipelineStage", "run_forward_pipeline"]


def run_forward_pipeline(stage: Stage, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward-only pipeline of ``pipe.num_chunks`` micro-batches, one stage per rank (``stage(x)``).

    It serves any stage, a :class:`~pippy.runtime.stage.Stage` too; one rank needs no other:

        >>> import torch.distributed as dist
        >>> from pippy import pipeline
        >>> from pippy.runtime.stage import Stage
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> net, x = torch.nn.Linear(3, 1), torch.randn(4, 3)
        >>> out = run_forward_pipeline(Stage(pipeline(net, 2, (x,)), 0), (x,), {})
        >>> torch.allclose(out, net(x), atol=1e-6), out.requires_grad  # forward only: no autograd graph
        (True, False)
        >>> dist.destroy_process_group()
    """
    sched = _stage_call_schedule(stage)
    return sched.eval(*args, **kwargs)


class _StageCall(_ScheduleForwardOnly):
    stage_call = True  # its messages say "stage(x)", what the user called


def _stage_call_schedule(stage: Stage) -> PipelineSchedule:
    """The forward-only schedule behind ``stage(x)``, built once per stage and held by it (a cycle the garbage
    collector frees with the stage; a global table keyed by the stage would keep it, and its waiter thread, for good)."""
    sched: PipelineSchedule | None = stage.__dict__.get("_pippy_call_schedule")
    if sched is None:
        sched = _StageCall(stage, stage.pipe.num_chunks)
        stage.__dict__["_pippy_call_schedule"] = sched
    return sched


class _StageKind(type):
    """``isinstance(x, PipelineStage)`` holds for hand-cut stages too (``PipelineStage(module, ...)`` builds one)."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return type.__instancecheck__(cls, obj) or (cls is PipelineStage and isinstance(obj, ManualStage))


class PipelineStage(Stage, metaclass=_StageKind):
    """The stage users build: a :class:`~pippy.runtime.stage.Stage` that can also run a forward pipeline.

    Calling it runs a forward-only pipeline of ``pipe.num_chunks`` micro-batches over all ranks of
    ``group`` (one stage per rank): ``stage(x)`` on the first rank, ``stage()`` on the others; the
    last rank gets the merged output, the others ``None``. Under torchrun::

        stage = PipelineStage(pipe, dist.get_rank(), torch.device("cpu"))
        out = stage(x) if dist.get_rank() == 0 else stage()

    A device no pipeline can compute on (``meta``, CUDA where there is none, a CPU stage under
    NCCL) is refused here, and from then on an optimizer of the traced model's own parameters
    is refused when it steps (see :mod:`pippy.runtime.guards`). With a single stage no other
    rank is needed:

        >>> import torch, torch.distributed as dist
        >>> from pippy import pipeline
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> stage = PipelineStage(pipeline(torch.nn.Linear(3, 1), 2, (torch.ones(4, 3),)), 0)
        >>> stage(torch.ones(4, 3)).shape
        torch.Size([4, 1])
        >>> dist.destroy_process_group()
    """

    def __new__(cls, pipe: Any = None, *args: Any, **kwargs: Any) -> Any:
        if pipe is None and "submodule" in kwargs:  # PyTorch pipelining's keyword form
            pipe = kwargs.pop("submodule")
        if cls is PipelineStage and isinstance(pipe, nn.Module):  # PyTorch pipelining's (module, index, n, device)
            return module_stage(pipe, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, pipe: SplitPipe, stage_index: int, device: torch.device | str = "cpu", group: Any = None,
                 *extra: Any, **torch_style: Any) -> None:
        if isinstance(pipe, SplitPipe) and (extra or torch_style):
            raise TypeError(f"PipelineStage(pipe, stage_index, device, group) takes no other arguments; got "
                            f"{len(extra)} more positional and {sorted(torch_style)}")
        if not isinstance(pipe, SplitPipe):
            raise TypeError(
                f"PipelineStage(pipe, stage_index, device, group) expected a pipe made by pippy.pipeline(model, ...) "
                f"or a module you cut yourself (PipelineStage(module, stage_index, num_stages, device, "
                f"input_args=...)), got {type(pipe).__name__}"
            )
        pipe._check_index(stage_index)
        dev = check_device(pipe, stage_index, device, group)
        super().__init__(pipe, stage_index, dev, group)
        watch_traced_parameters(pipe)
        pipe.bind_stage(stage_index, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return run_forward_pipeline(self, args, kwargs)

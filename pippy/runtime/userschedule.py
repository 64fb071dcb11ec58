"""The bases of the schedule classes users build: their arguments checked, one stage or a list per rank.

:class:`PipelineScheduleSingle` (one stage per rank) and :class:`PipelineScheduleMulti` (a list
of this rank's stages) check what users pass (stages, ``n_microbatches``, ``loss_fn``, PyTorch
pipelining's options) before anything is generated; :mod:`pippy.runtime.api` holds the classes
built on them (GPipe, 1F1B, interleaved, zero bubble, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from pippy.frontend.describe import describe_split_sites
from pippy.frontend.pipe import SplitPipe
from pippy.microbatch import TensorChunkSpec
from pippy.runtime.guards import check_loss_fn, check_stages, rank_or_none
from pippy.runtime.legacy import MicrobatchSteps
from pippy.runtime.order_io import OrderIO
from pippy.runtime.peer_attrs import PeerAttributes
from pippy.runtime.schedule_base import PipelineSchedule
from pippy.runtime.stage import Stage, StageError
from pippy.runtime.stageerror import StageCountError
from pippy.schedules.ir import Schedule

__all__ = ["PipelineScheduleMulti", "PipelineScheduleSingle"]


def _called(sched: Any) -> str:
    """What the user called: ``stage(x)`` for the forward pipeline behind a stage call, else the schedule's class."""
    return "stage(x)" if getattr(type(sched), "stage_call", False) else type(sched).__name__


class _UserSchedule(MicrobatchSteps, OrderIO, PeerAttributes, PipelineSchedule):
    """The schedule classes users build: their arguments are checked before anything is generated."""

    def __init__(
        self,
        stages: Stage | Sequence[Stage],
        n_microbatches: int,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        *more: Any,
        **kwargs: Any,
    ) -> None:
        name = _called(self)
        if more:  # PiPPy's 4th positional argument was output_merge_spec, PyTorch's is args_chunk_spec
            raise TypeError(
                f"{name}() takes the stage(s), n_microbatches and loss_fn positionally, got {len(more)} more. Pass the "
                "rest by keyword: output_merge_spec=... (PiPPy's 4th argument), or args_chunk_spec=, "
                "kwargs_chunk_spec=, output_merge_spec=, scale_grads= (PyTorch's 4th to 7th)"
            )
        transport = kwargs.get("transport")
        rank = transport.rank if transport is not None else rank_or_none()
        stages = check_stages(name, stages, rank)
        if isinstance(n_microbatches, bool) or not isinstance(n_microbatches, int) or n_microbatches < 1:
            raise ValueError(
                f"{name}: n_microbatches must be a positive int (how many micro-batches a step splits the batch "
                f"into), got {n_microbatches!r}; e.g. {name}(stage, n_microbatches=4, loss_fn=...)"
            )
        if transport is None and not (dist.is_available() and dist.is_initialized()):
            raise StageError(
                f"{name}: no torch.distributed process group. Expected dist.init_process_group(...) on every rank "
                "before stage(x) or building a schedule (under torchrun: dist.init_process_group('gloo'), or 'nccl' "
                "for CUDA stages); to run every stage in one process, use pippy.runtime.local.LocalPipeline"
            )
        if transport is None:
            rank = rank_or_none(stages[0].group)  # the rank in the pipeline's own group
        check_loss_fn(name, loss_fn, stages[0].pipe.num_stages - 1, rank)
        flag = "scale_grads" in kwargs
        _torch_options(name, stages, kwargs)
        super().__init__(stages, n_microbatches, loss_fn, **kwargs)
        self._reduction_option = "scale_grads" if flag else "loss_reduction"  # which one the user gave


def _torch_options(name: str, stages: Sequence[Stage], kwargs: dict[str, Any]) -> None:
    """Take PyTorch's pipelining package's schedule options: ``scale_grads`` (True: grads of the micro-batches'
    mean, ``loss_reduction="mean"``; False: of their sum), and chunk specs: those of hand-cut stages (which
    have no ``pipeline()`` call to take them), or ones that repeat a traced pipe's."""
    pipe = stages[0].pipe
    if "scale_grads" in kwargs:
        scale = kwargs.pop("scale_grads")
        if kwargs.get("loss_reduction") is not None:
            raise TypeError(f"{name}: pass loss_reduction= or torch's scale_grads=, not both")
        kwargs["loss_reduction"] = "mean" if scale else "sum"
    for key in ("args_chunk_spec", "kwargs_chunk_spec"):
        if key in kwargs and getattr(pipe, "manual", False):  # each rank splits its own inputs by these
            given = kwargs.pop(key)
            for st in stages:
                setattr(st.pipe, key, given)
        elif key in kwargs:
            given, traced = kwargs.pop(key), getattr(pipe, key, None)
            if given is not None and given != traced and not (_default_spec(given) and _default_spec(traced)):
                raise TypeError(
                    f"{name}: {key}={given!r} differs from the one the pipe was traced with ({traced!r}). pippy splits "
                    f"the batch as it traced it: pass {key}= to pipeline(...) instead of the schedule"
                )


def _default_spec(spec: Any) -> bool:
    """Whether a chunk spec splits every leaf along dim 0, as none does (``(TensorChunkSpec(0),)``, ``{"x": None}``)."""
    if spec is None or spec == TensorChunkSpec(0):
        return True
    if type(spec).__name__ == "TensorChunkSpec" and getattr(spec, "split_dim", None) == 0:  # PyTorch pipelining's
        return True
    if isinstance(spec, dict):
        return all(_default_spec(v) for v in spec.values())
    return isinstance(spec, tuple | list) and all(_default_spec(v) for v in spec)


def _stage_fix(pipe: SplitPipe, n: int) -> str:
    """How to get ``n`` stages: split the traced model into ``n`` (saying where its stages came from), or build
    ``n`` hand-cut stages (a pipe of ``PipelineStage(module, i, num_stages, device)``, which no split made)."""
    if getattr(pipe, "manual", False):
        return (f"build {n} hand-cut stages (PipelineStage(module, i, {n}, device) for i in 0..{n - 1}; these were "
                f"built with num_stages={pipe.num_stages})")
    return f"split the model into {n} stages ({describe_split_sites(getattr(pipe, 'split_sites', None), pipe.num_stages)})"


class PipelineScheduleSingle(_UserSchedule):
    """Base of the schedules that run one stage per rank (GPipe, 1F1B, ZB-H1/H2); ``issubclass`` tells them apart.

    A subclass defines ``_make(p)``, returning a :class:`~pippy.schedules.ir.Schedule` for ``p``
    ranks and ``self.n_microbatches``; it is checked, lowered and run like the built-in ones. Built
    as it is, the class runs the order given to ``_load_csv`` / ``_load_actions``
    (:mod:`pippy.runtime.order_io`). A subclass that runs 1F1B's order, on a world of one rank here:

        >>> import torch, torch.distributed as dist
        >>> from pippy import ScheduleGPipe, ScheduleZBV, pipeline
        >>> from pippy.schedules.generators import one_f_one_b
        >>> issubclass(ScheduleGPipe, PipelineScheduleSingle), issubclass(ScheduleZBV, PipelineScheduleSingle)
        (True, False)
        >>> class My1F1B(PipelineScheduleSingle):
        ...     def _make(self, p: int) -> Schedule:
        ...         return one_f_one_b(p, self.n_microbatches)
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> net, x, y = torch.nn.Linear(3, 1), torch.randn(4, 3), torch.randn(4, 1)
        >>> sched = My1F1B(pipeline(net, 2, (x,)).build_stage(0, "cpu"), 2, torch.nn.functional.mse_loss)
        >>> torch.allclose(sched.step(x, target=y), net(x), atol=1e-6)
        True
        >>> print(sched.schedule)
        1f1b: 1 ranks, 1 stages, 2 microbatches
        rank 0: 0F0 0B0 0F1 0B1
        >>> dist.destroy_process_group()
    """

    def _generate(self) -> Schedule | None:
        if len(self.stages) != 1:
            raise StageError(
                f"{_called(self)} runs one stage per rank; got {len(self.stages)} stages "
                f"{[st.index for st in self.stages]} on rank {self.rank}. Pass this rank's one stage, or use a "
                "multi-stage schedule (ScheduleInterleaved1F1B, ScheduleLoopedBFS, ScheduleZBV, ScheduleDualPipeV)"
            )
        p = self._num_ranks()
        if p != self.pipe.num_stages:
            raise StageError(
                f"{_called(self)}: world size is {p} but the pipe has {self.pipe.num_stages} stages; a "
                f"one-stage-per-rank schedule needs exactly one rank per stage. Launch {self.pipe.num_stages} ranks "
                f"(torchrun --nproc-per-node {self.pipe.num_stages}) or {_stage_fix(self.pipe, p)}; with more ranks than stages (data x pipeline parallel), pass each stage "
                "its pipeline group: build_stage(i, device, group=...) or a DeviceMesh's 'pp' dimension."
            )
        return self._make(p)

    def _make(self, p: int) -> Schedule | None:
        return None  # no order of its own: _load_csv / _load_actions give one


class PipelineScheduleMulti(_UserSchedule):
    """Base of the schedules that take a list of this rank's stages (interleaved, looped BFS, V-shaped, CSV).

    A subclass defines ``_make(p)``, or loads an order, as for :class:`PipelineScheduleSingle`.
    Here one rank holds both stages of a 2-stage pipe and runs an order it loads:

        >>> import torch, torch.distributed as dist
        >>> from pippy import SplitPoint, pipeline
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
        >>> x, y = torch.randn(4, 3), torch.randn(4, 1)
        >>> pipe = pipeline(net, 2, (x,), split_spec={"0": SplitPoint.END})
        >>> sched = PipelineScheduleMulti([pipe.build_stage(0, "cpu"), pipe.build_stage(1, "cpu")], 2,
        ...                               loss_fn=torch.nn.functional.mse_loss)
        >>> sched._load_actions({0: ["0F0", "1F0", "1B0", "0B0", "0F1", "1F1", "1B1", "0B1"]})
        >>> torch.allclose(sched.step(x, target=y), net(x), atol=1e-6)
        True
        >>> sched._dump_actions()
        {0: ['0F0', '1F0', '1B0', '0B0', '0F1', '1F1', '1B1', '0B1']}
        >>> dist.destroy_process_group()
    """

    multi_stage = True

    def _generate(self) -> Schedule | None:
        return _generate_multi(self)

    def _make(self, p: int) -> Schedule | None:
        return None  # no order of its own: _load_csv / _load_actions give one


def _generate_multi(sched: Any) -> Schedule | None:
    """The schedule of a multi-stage class on this group, with the generator's errors naming class and rank."""
    p = sched._num_ranks()
    name = type(sched).__name__
    try:
        sch: Schedule | None = sched._make(p)
    except ValueError as exc:  # the generator's own check (e.g. DualPipeV's m >= 2p-1): name the class and rank
        raise ValueError(f"{name} on rank {sched.rank} of {p}: {exc}") from None
    if sch is None:
        return None
    if sch.num_stages != sched.pipe.num_stages:
        per = sch.num_stages // p
        raise StageCountError(
            f"{name}: on {p} rank(s) this schedule runs {sch.num_stages} stages, {per} per rank (placement "
            f"{list(sch.stage_to_rank)}: stage s runs on rank placement[s]), but the pipe has {sched.pipe.num_stages} "
            f"stages, {len(sched.stages)} of them passed on this rank. Expected {sch.num_stages} stages: "
            f"{_stage_fix(sched.pipe, sch.num_stages)}, and pass each rank the stages {name}.placement({p}, {per}) "
            "puts on it"
        )
    return sch

"""Schedule classes users call: ``step()`` to train, ``eval()`` to infer; all run on the one executor.

Gradient rule: with ``loss_reduction="mean"`` (default) each micro-batch loss is scaled by
``1/n_microbatches`` before backward, so for a mean-reduced ``loss_fn`` and equal micro-batches
every ``.grad`` equals ``loss_fn(model(full_batch), full_target).backward()``. With
``loss_reduction="sum"`` losses are not scaled and grads equal the full-batch sum. Left unset, the
reduction is read off ``loss_fn`` or the model's loss graph, or measured (see ``schedule_base``).
Under data parallelism (DDP, ``replicate``, FSDP2, HSDP) the seeds are scaled further so that the
wrapper's average gives the global batch's gradients for mean, sum and counted-mean losses
(``pippy.runtime.dploss``).

Under torchrun each rank builds its stage(s) and calls the same schedule::

    sched = ScheduleGPipe(stage, n_microbatches=4, loss_fn=torch.nn.functional.mse_loss)
    out = sched.step(x, target=y, losses=losses)     # x on the first rank, target on the last

In one process (tests, notebooks) :class:`pippy.runtime.local.LocalPipeline` drives every rank.
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
from pippy.schedules import generators as gen
from pippy.schedules.ir import Schedule, loop_placement, v_placement
from pippy.sim.choose import fit_costs, zbv_for_costs
from pippy.sim.cost import CostModel
from pippy.sim.synthesize import Synthesis, synthesize

__all__ = [
    "PipelineSchedule",
    "PipelineScheduleMulti",
    "PipelineScheduleSingle",
    "Schedule1F1B",
    "ScheduleDualPipeV",
    "ScheduleFromCSV",
    "ScheduleGPipe",
    "ScheduleInterleaved1F1B",
    "ScheduleLoopedBFS",
    "ScheduleSynthesized",
    "ScheduleZBH1",
    "ScheduleZBH2",
    "ScheduleZBV",
]


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
        _torch_options(name, stages, kwargs)
        super().__init__(stages, n_microbatches, loss_fn, **kwargs)


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


def _split_hint(pipe: SplitPipe) -> str:
    return describe_split_sites(getattr(pipe, "split_sites", None), pipe.num_stages)


class PipelineScheduleSingle(_UserSchedule):
    """Base of the schedules that run one stage per rank (GPipe, 1F1B, ZB-H1/H2); ``issubclass`` tells them apart.

    A subclass defines ``_make(p)``, returning a :class:`~pippy.schedules.ir.Schedule` for ``p``
    ranks and ``self.n_microbatches``; it is checked, lowered and run like the built-in ones. Built
    as it is, the class runs the order given to ``_load_csv`` / ``_load_actions``
    (:mod:`pippy.runtime.order_io`).
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
                f"(torchrun --nproc-per-node {self.pipe.num_stages}) or split the model into {p} stages "
                f"({_split_hint(self.pipe)}); with more ranks than stages (data x pipeline parallel), pass each stage "
                "its pipeline group: build_stage(i, device, group=...) or a DeviceMesh's 'pp' dimension."
            )
        return self._make(p)

    def _make(self, p: int) -> Schedule | None:
        return None  # no order of its own: _load_csv / _load_actions give one


class PipelineScheduleMulti(_UserSchedule):
    """Base of the schedules that take a list of this rank's stages (interleaved, looped BFS, V-shaped, CSV).

    A subclass defines ``_make(p)``, or loads an order, as for :class:`PipelineScheduleSingle`.
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
        raise StageError(
            f"{name}: with {p} ranks and {len(sched.stages)} stages per rank this schedule places "
            f"{sch.num_stages} stages (placement {list(sch.stage_to_rank)}) but the pipe has "
            f"{sched.pipe.num_stages}; split the model into {sch.num_stages} stages ({_split_hint(sched.pipe)}), "
            f"or pass each rank the stages {name}.placement({p}, v) puts on it"
        )
    return sch


class ScheduleGPipe(PipelineScheduleSingle):
    """GPipe: all forwards, then all backwards. Memory: every micro-batch's activations at once."""

    name = "gpipe"

    def _make(self, p: int) -> Schedule:
        return gen.gpipe(p, self.n_microbatches)


class Schedule1F1B(PipelineScheduleSingle):
    """1F1B: warm-up forwards, then alternate; at most p micro-batches of activations per rank."""

    name = "1f1b"

    def _make(self, p: int) -> Schedule:
        return gen.one_f_one_b(p, self.n_microbatches)


class ScheduleZBH1(PipelineScheduleSingle):
    """Zero Bubble H1: 1F1B memory, weight-grad passes fill the bubble.

    Given several stages per rank (``ScheduleZBH1.placement(p, v)`` puts stage ``s`` on rank
    ``s % p``), it runs interleaved zero bubble (:func:`pippy.schedules.generators.interleaved_zb`):
    interleaved 1F1B's order with split backward and deferred W's.
    """

    name = "zb_h1"

    def _generate(self) -> Schedule | None:
        return super()._generate() if len(self.stages) == 1 else _generate_multi(self)

    def _make(self, p: int) -> Schedule:
        if len(self.stages) == 1:
            return gen.zb_h1(p, self.n_microbatches)
        return gen.interleaved_zb(p, self.n_microbatches, v=len(self.stages))


class ScheduleZBH2(PipelineScheduleSingle):
    """Zero Bubble H2: more warm-up to remove the start bubble, at higher memory."""

    name = "zb_h2"

    def _make(self, p: int) -> Schedule:
        return gen.zb_h2(p, self.n_microbatches)


class ScheduleInterleaved1F1B(PipelineScheduleMulti):
    """Interleaved 1F1B (Megatron): ``len(stages)`` stages per rank, looped placement."""

    name = "interleaved_1f1b"

    def _make(self, p: int) -> Schedule:
        if len(self.stages) < 2:
            raise ValueError(
                f"interleaving needs at least 2 stages per rank, got {len(self.stages)}; use Schedule1F1B for one "
                "stage per rank, or split the model into 2+ stages per rank and pass them all"
            )
        return gen.interleaved_1f1b(p, self.n_microbatches, v=len(self.stages))


class ScheduleLoopedBFS(PipelineScheduleMulti):
    """Looped BFS: breadth-first over local stages, looped placement."""

    name = "looped_bfs"

    def _make(self, p: int) -> Schedule:
        return gen.looped_bfs(p, self.n_microbatches, v=len(self.stages))


class _VShape(PipelineScheduleMulti):
    @classmethod
    def placement(cls, num_ranks: int, stages_per_rank: int = 2) -> tuple[int, ...]:
        """Rank r holds stages r and 2p-1-r."""
        return v_placement(num_ranks)


class ScheduleZBV(_VShape):
    """ZB-V: two stages per rank in a V, split backward.

    ``costs`` (a :class:`~pippy.sim.cost.CostModel`, e.g. from ``pippy.sim.profile``) pick the
    faster of ZB-V's two orders for your hardware (:func:`pippy.sim.choose.zbv_for_costs`,
    simulating each with gradless backwards deferred and I+W fused, as this class runs it by
    default); without them, default costs decide. Rank
    ``r`` passes its two stages, ``[stage_r, stage_(2p-1-r)]``::

        ScheduleZBV([stage_a, stage_b], 8, loss_fn=F.cross_entropy, costs=profiled).step(x, target=y)
    """

    name = "zbv"

    def _make(self, p: int) -> Schedule:
        return zbv_for_costs(p, self.n_microbatches, self.costs, gradless_stages=self.gradless_stages(),
                             compact=self.fill_bubbles)  # judged as it will run: compacted when filling


class ScheduleSynthesized(PipelineScheduleMulti):
    """A schedule built for your costs and memory limit (:func:`pippy.sim.synthesize.synthesize`), not a fixed one.

    ``costs`` (a :class:`~pippy.sim.cost.CostModel`, e.g. from ``pippy.sim.profile``; ``None``: the
    default costs) and ``memory_limit`` (bytes per rank, as the costs count them) must be the same on
    every rank. Pass each rank its stages in one of the placements the synthesizer knows: one
    stage per rank, the V (rank ``r``: stages ``r`` and ``2p-1-r``) or the interleaved loop
    (stage ``s`` on rank ``s % p``); it builds for that placement. Where a rank's stages fit both
    (the middle rank of an odd number of ranks), name it: ``layout="v"`` or ``"loop"``, the same on
    every rank. ``synthesis`` then tells what was chosen and how it compares with the best fixed
    schedule::

        ScheduleSynthesized([stage_a, stage_b], 8, loss_fn=F.cross_entropy, costs=profiled).step(x, target=y)
    """

    name = "synth"

    def __init__(self, stages: Stage | Sequence[Stage], n_microbatches: int, loss_fn: Callable[..., torch.Tensor] | None = None, *,
                 costs: CostModel | None = None, memory_limit: float | None = None, layout: str | None = None,
                 **kwargs: Any) -> None:
        if layout not in (None, "v", "loop"):
            raise ValueError(f"ScheduleSynthesized: layout must be 'v', 'loop' or None (read off the stages), got {layout!r}")
        self.memory_limit = memory_limit
        self.layout = layout
        self.synthesis: Synthesis | None = None
        super().__init__(stages, n_microbatches, loss_fn, costs=costs, **kwargs)

    def _make(self, p: int) -> Schedule:
        n = self.pipe.num_stages
        mine = sorted(st.index for st in self.stages)
        named = {"loop": loop_placement(p, max(1, n // p)), "v": v_placement(p) if n == 2 * p else None}
        layouts = [(k, pl) for k, pl in named.items() if pl is not None and n % p == 0 and len(pl) == n
                   and (self.layout is None or k == self.layout) and [s for s in range(n) if pl[s] == self.rank] == mine]
        if self.layout is None and n == 2 * p and p % 2 == 1 and p > 1:  # every rank raises, not only the middle one
            raise ValueError(
                f"with {p} ranks (odd) the middle rank's stages fit both the V and the interleaved loop, so the "
                "ranks cannot tell them apart from their stages; pass layout='v' or layout='loop' (the same on "
                "every rank)"
            )
        if not layouts:
            raise ValueError(
                f"this rank holds stages {mine} of {n}; the synthesizer places one stage per rank, the V (rank r: "
                f"stages r and 2p-1-r) or the interleaved loop (stage s on rank s % p)"
                f"{'' if self.layout is None else f', and layout={self.layout!r} was asked'}. Pass each rank its "
                "stages in one of those"
            )
        costs = fit_costs(self.costs, n)
        self.synthesis = synthesize(p, self.n_microbatches, costs, memory_limit=self.memory_limit,
                                    gradless_stages=self.gradless_stages(), placement=layouts[0][1])
        return self.synthesis.schedule


class ScheduleDualPipeV(_VShape):
    """DualPipeV: two stages per rank in a V, split backward."""

    name = "dualpipev"

    def _make(self, p: int) -> Schedule:
        return gen.dualpipev(p, self.n_microbatches)


class ScheduleFromCSV(PipelineScheduleMulti):
    """Run a schedule read from CSV (compute-only or lowered); it must pass validation first.

    Each rank passes the stages the CSV places on it (see :mod:`pippy.schedules.lower` for the
    format)::

        ScheduleFromCSV("my.csv", stages, loss_fn=F.mse_loss).step(x, target=y)
    """

    name = "csv"

    def __init__(
        self,
        path: str,
        stages: Stage | Sequence[Stage],
        loss_fn: Callable[..., torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        from pippy.schedules.lower import from_csv

        sch = from_csv(path).compute_only()
        super().__init__(stages, sch.n_microbatches, loss_fn, schedule=sch, **kwargs)
        if sch.n_microbatches != self.pipe.num_chunks and self.pipe.input_dims is None:
            self._warn_once("csv-microbatches", (
                f"ScheduleFromCSV: {path} has {sch.n_microbatches} micro-batches (its largest micro-batch index + 1, or "
                f"its header) but the pipe was traced with num_chunks={self.pipe.num_chunks}; a step's batch must "
                f"then hold {sch.n_microbatches} of the traced micro-batches. Add the missing micro-batches to the "
                "CSV, or trace with pipeline(model, num_chunks=...) to match"))

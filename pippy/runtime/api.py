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

from pippy.runtime.schedule_base import PipelineSchedule
from pippy.runtime.stage import Stage
from pippy.runtime.userschedule import PipelineScheduleMulti, PipelineScheduleSingle, _generate_multi
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


class ScheduleGPipe(PipelineScheduleSingle):
    """GPipe: all forwards, then all backwards. Memory: every micro-batch's activations at once.

    On a world of one rank (as ``torchrun --nproc-per-node 1`` gives) the output is the model's:

        >>> import torch, torch.distributed as dist
        >>> from pippy import pipeline
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one-rank world
        >>> net, x, y = torch.nn.Linear(3, 1), torch.randn(8, 3), torch.randn(8, 1)
        >>> sched = ScheduleGPipe(pipeline(net, 4, (x,)).build_stage(0, "cpu"), 4, torch.nn.functional.mse_loss)
        >>> torch.allclose(sched.step(x, target=y), net(x), atol=1e-6)
        True
        >>> print(sched.schedule)  # what this rank ran
        gpipe: 1 ranks, 1 stages, 4 microbatches
        rank 0: 0F0 0F1 0F2 0F3 0B3 0B2 0B1 0B0
        >>> dist.destroy_process_group()
    """

    name = "gpipe"

    def _make(self, p: int) -> Schedule:
        return gen.gpipe(p, self.n_microbatches)


class Schedule1F1B(PipelineScheduleSingle):
    """1F1B: warm-up forwards, then alternate; at most p micro-batches of activations per rank.

    One loss per micro-batch; their mean and the gradients are the full batch's (one rank here):

        >>> import torch, torch.distributed as dist
        >>> from pippy import pipeline
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one-rank world
        >>> net, x, y = torch.nn.Linear(3, 1), torch.randn(8, 3), torch.randn(8, 1)
        >>> stage, losses = pipeline(net, 4, (x,)).build_stage(0, "cpu"), []
        >>> sched = Schedule1F1B(stage, 4, loss_fn=torch.nn.functional.mse_loss)
        >>> out = sched.step(x, target=y, losses=losses)
        >>> loss = torch.nn.functional.mse_loss(net(x), y); loss.backward()
        >>> torch.allclose(sum(losses) / 4, loss), torch.allclose(stage.submod.weight.grad, net.weight.grad, atol=1e-6)
        (True, True)
        >>> print(sched.schedule)
        1f1b: 1 ranks, 1 stages, 4 microbatches
        rank 0: 0F0 0B0 0F1 0B1 0F2 0B2 0F3 0B3
        >>> dist.destroy_process_group()
    """

    name = "1f1b"

    def _make(self, p: int) -> Schedule:
        return gen.one_f_one_b(p, self.n_microbatches)


class ScheduleZBH1(PipelineScheduleSingle):
    """Zero Bubble H1: 1F1B memory, weight-grad passes fill the bubble.

    Given several stages per rank (``ScheduleZBH1.placement(p, v)`` puts stage ``s`` on rank
    ``s % p``), it runs interleaved zero bubble (:func:`pippy.schedules.generators.interleaved_zb`):
    interleaved 1F1B's order with split backward and deferred W's. With ``fuse_backward=False``
    every backward stays split into I (input grads) and W (weight grads), as on one rank here:

        >>> import torch, torch.distributed as dist
        >>> from pippy import pipeline
        >>> ScheduleZBH1.placement(2, 2)  # 2 ranks, 2 stages each
        (0, 1, 0, 1)
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one-rank world
        >>> net, x, y = torch.nn.Linear(3, 1), torch.randn(4, 3), torch.randn(4, 1)
        >>> stage = pipeline(net, 2, (x,)).build_stage(0, "cpu")
        >>> sched = ScheduleZBH1(stage, 2, loss_fn=torch.nn.functional.mse_loss, fuse_backward=False)
        >>> torch.allclose(sched.step(x, target=y), net(x), atol=1e-6)
        True
        >>> print(sched.schedule)
        zb_h1: 1 ranks, 1 stages, 2 microbatches
        rank 0: 0F0 0I0 0W0 0F1 0I1 0W1
        >>> dist.destroy_process_group()
    """

    name = "zb_h1"

    def _generate(self) -> Schedule | None:
        return super()._generate() if len(self.stages) == 1 else _generate_multi(self)

    def _make(self, p: int) -> Schedule:
        if len(self.stages) == 1:
            return gen.zb_h1(p, self.n_microbatches)
        return gen.interleaved_zb(p, self.n_microbatches, v=len(self.stages))


class ScheduleZBH2(PipelineScheduleSingle):
    """Zero Bubble H2: more warm-up to remove the start bubble, at higher memory.

    Gradients equal the full batch's, as for every schedule (one rank here):

        >>> import torch, torch.distributed as dist
        >>> from pippy import pipeline
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one-rank world
        >>> net, x, y = torch.nn.Linear(3, 1), torch.randn(4, 3), torch.randn(4, 1)
        >>> stage = pipeline(net, 2, (x,)).build_stage(0, "cpu")
        >>> out = ScheduleZBH2(stage, 2, loss_fn=torch.nn.functional.mse_loss).step(x, target=y)
        >>> torch.nn.functional.mse_loss(net(x), y).backward()
        >>> torch.allclose(out, net(x), atol=1e-6), torch.allclose(stage.submod.bias.grad, net.bias.grad, atol=1e-6)
        (True, True)
        >>> dist.destroy_process_group()
    """

    name = "zb_h2"

    def _make(self, p: int) -> Schedule:
        return gen.zb_h2(p, self.n_microbatches)


class ScheduleInterleaved1F1B(PipelineScheduleMulti):
    """Interleaved 1F1B (Megatron): ``len(stages)`` stages per rank, looped placement.

    Each rank passes the list of its stages (here one rank holds both stages of a 2-stage pipe):

        >>> import torch, torch.distributed as dist, torch.nn as nn
        >>> from pippy import SplitPoint, pipeline
        >>> ScheduleInterleaved1F1B.placement(2, 2)  # stage s on rank s % 2
        (0, 1, 0, 1)
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one-rank world
        >>> net, x, y = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)), torch.randn(4, 3), torch.randn(4, 1)
        >>> pipe = pipeline(net, 2, (x,), split_spec={"0": SplitPoint.END})
        >>> stages = [pipe.build_stage(0, "cpu"), pipe.build_stage(1, "cpu")]  # this rank's stages
        >>> sched = ScheduleInterleaved1F1B(stages, 2, loss_fn=torch.nn.functional.mse_loss)
        >>> torch.allclose(sched.step(x, target=y), net(x), atol=1e-6)
        True
        >>> print(sched.schedule)
        interleaved_1f1b: 1 ranks, 2 stages, 2 microbatches
        rank 0: 0F0 1F0 1B0 0F1 0B0 1F1 1B1 0B1
        >>> dist.destroy_process_group()
    """

    name = "interleaved_1f1b"

    def _make(self, p: int) -> Schedule:
        return gen.interleaved_1f1b(p, self.n_microbatches, v=len(self.stages))  # one stage per rank: 1F1B


class ScheduleLoopedBFS(PipelineScheduleMulti):
    """Looped BFS: breadth-first over local stages, looped placement.

    Every micro-batch through a stage before the next stage starts (one rank, both stages here):

        >>> import torch, torch.distributed as dist, torch.nn as nn
        >>> from pippy import SplitPoint, pipeline
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one-rank world
        >>> net, x, y = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)), torch.randn(4, 3), torch.randn(4, 1)
        >>> pipe = pipeline(net, 2, (x,), split_spec={"0": SplitPoint.END})
        >>> stages = [pipe.build_stage(0, "cpu"), pipe.build_stage(1, "cpu")]  # this rank's stages
        >>> sched = ScheduleLoopedBFS(stages, 2, loss_fn=torch.nn.functional.mse_loss)
        >>> torch.allclose(sched.step(x, target=y), net(x), atol=1e-6)
        True
        >>> print(sched.schedule)
        looped_bfs: 1 ranks, 2 stages, 2 microbatches
        rank 0: 0F0 0F1 1F0 1F1 1B1 1B0 0B1 0B0
        >>> dist.destroy_process_group()
    """

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

    On one rank, which holds both stages of a 2-stage pipe:

        >>> import torch, torch.distributed as dist, torch.nn as nn
        >>> from pippy import SplitPoint, pipeline
        >>> ScheduleZBV.placement(2)  # rank 0: stages 0 and 3, rank 1: stages 1 and 2
        (0, 1, 1, 0)
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one-rank world
        >>> net, x, y = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)), torch.randn(4, 3), torch.randn(4, 1)
        >>> pipe = pipeline(net, 2, (x,), split_spec={"0": SplitPoint.END})
        >>> stages = [pipe.build_stage(0, "cpu"), pipe.build_stage(1, "cpu")]  # this rank's stages
        >>> sched = ScheduleZBV(stages, 2, loss_fn=torch.nn.functional.mse_loss)
        >>> torch.allclose(sched.step(x, target=y), net(x), atol=1e-6)
        True
        >>> dist.destroy_process_group()
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

    On one rank, which holds both stages of a 2-stage pipe (default costs, no memory limit):

        >>> import torch, torch.distributed as dist, torch.nn as nn
        >>> from pippy import SplitPoint, pipeline
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one-rank world
        >>> net, x, y = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)), torch.randn(4, 3), torch.randn(4, 1)
        >>> pipe = pipeline(net, 2, (x,), split_spec={"0": SplitPoint.END})
        >>> stages = [pipe.build_stage(0, "cpu"), pipe.build_stage(1, "cpu")]  # this rank's stages
        >>> sched = ScheduleSynthesized(stages, 2, loss_fn=torch.nn.functional.mse_loss)
        >>> torch.allclose(sched.step(x, target=y), net(x), atol=1e-6)
        True
        >>> sched.synthesis.rule, sched.synthesis.built  # no built order beat the fixed one here
        ('interleaved_1f1b', False)
        >>> dist.destroy_process_group()
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
    """DualPipeV: two stages per rank in a V, split backward.

    Rank ``r`` passes stages ``r`` and ``2p-1-r`` (one rank holds both stages here):

        >>> import torch, torch.distributed as dist, torch.nn as nn
        >>> from pippy import SplitPoint, pipeline
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one-rank world
        >>> net, x, y = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)), torch.randn(4, 3), torch.randn(4, 1)
        >>> pipe = pipeline(net, 2, (x,), split_spec={"0": SplitPoint.END})
        >>> stages = [pipe.build_stage(0, "cpu"), pipe.build_stage(1, "cpu")]  # this rank's stages
        >>> sched = ScheduleDualPipeV(stages, 2, loss_fn=torch.nn.functional.mse_loss)
        >>> torch.allclose(sched.step(x, target=y), net(x), atol=1e-6)
        True
        >>> print(sched.schedule)
        dualpipev: 1 ranks, 2 stages, 2 microbatches
        rank 0: 0F0 1F0 0F1 1B0 1F1 0B0 1B1 0B1
        >>> dist.destroy_process_group()
    """

    name = "dualpipev"

    def _make(self, p: int) -> Schedule:
        return gen.dualpipev(p, self.n_microbatches)


class ScheduleFromCSV(PipelineScheduleMulti):
    """Run a schedule read from CSV (compute-only or lowered); it must pass validation first.

    Each rank passes the stages the CSV places on it (see :mod:`pippy.schedules.lower` for the
    format)::

        ScheduleFromCSV("my.csv", stages, loss_fn=F.mse_loss).step(x, target=y)

    Here one rank runs both stages of a 2-stage pipe in the order its CSV row gives:

        >>> import os, tempfile, torch, torch.distributed as dist, torch.nn as nn
        >>> from pippy import SplitPoint, pipeline
        >>> path = os.path.join(tempfile.mkdtemp(), "order.csv")
        >>> with open(path, "w") as f:
        ...     _ = f.write("0F0,0F1,1F0,1F1,1B0,1B1,0B0,0B1")  # one row per rank
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one-rank world
        >>> net, x, y = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)), torch.randn(4, 3), torch.randn(4, 1)
        >>> pipe = pipeline(net, 2, (x,), split_spec={"0": SplitPoint.END})
        >>> stages = [pipe.build_stage(0, "cpu"), pipe.build_stage(1, "cpu")]  # this rank's stages
        >>> sched = ScheduleFromCSV(path, stages, loss_fn=torch.nn.functional.mse_loss)
        >>> torch.allclose(sched.step(x, target=y), net(x), atol=1e-6), sched.n_microbatches
        (True, 2)
        >>> dist.destroy_process_group()
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

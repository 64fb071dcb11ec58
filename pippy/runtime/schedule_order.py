"""The order a schedule runs, made from a compute order: backward fused or split, W's compacted, checked, lowered.

A mixin of :class:`pippy.runtime.schedule_base.PipelineSchedule`: ``_install`` runs once at
construction (a generated or given order) and again for an order loaded later
(:mod:`pippy.runtime.order_io`).
"""

from __future__ import annotations

from pippy.frontend.pipe import SplitPipe
from pippy.runtime.executor import Executor
from pippy.runtime.guards import check_placement
from pippy.runtime.stage import Stage
from pippy.runtime.transport import Transport
from pippy.schedules import generators as gen
from pippy.schedules.ir import Schedule, loop_placement
from pippy.schedules.lower import lower, runtime_form
from pippy.schedules.validate import validate
from pippy.sim.choose import fastest_form, fit_costs
from pippy.sim.compact import compact_w
from pippy.sim.cost import CostModel

__all__ = ["RunOrder"]


class RunOrder:
    """Installs the order a schedule runs (mixed into the schedule base, which sets these).

    Every schedule class says where it puts stages, and runs its order with backward fused or, as
    asked here, split into I (input grads) and W (weight grads):

        >>> import torch
        >>> from pippy import Schedule1F1B, ScheduleZBH1, SplitPoint, pipeline
        >>> from pippy.runtime.localcomm import LocalTransport
        >>> Schedule1F1B.placement(2), ScheduleZBH1.placement(2, 2)  # stage s on rank placement[s]
        ((0, 1), (0, 1, 0, 1))
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
        >>> pipe = pipeline(net, 2, (torch.ones(4, 3),), split_spec={"0": SplitPoint.END})
        >>> stages = [pipe.build_stage(0, "cpu"), pipe.build_stage(1, "cpu")]
        >>> sched = ScheduleZBH1(stages, 2, transport=LocalTransport.world(1)[0], fuse_backward=False)
        >>> sched.gradless_stages()  # stage 0 reads the batch, which needs no gradient
        [0]
        >>> print(sched.schedule)
        interleaved_zb: 1 ranks, 2 stages, 2 microbatches
        rank 0: 0F0 1F0 1I0 1W0 0F1 0I0 0W0 1F1 1I1 1W1 0I1 0W1
    """

    name: str
    rank: int
    n_microbatches: int
    pipe: SplitPipe
    stages: list[Stage]
    transport: Transport
    costs: CostModel | None
    fill_bubbles: bool
    schedule: Schedule | None
    _eval_schedule: Schedule | None
    _fuse_backward: bool | str
    fused_backward: bool
    _executors: dict[int, Executor]
    _agreed: bool

    def _install(self, compute: Schedule, generated: bool) -> None:
        """Make ``compute`` (compute actions only) the order this schedule runs: fused, compacted, checked, lowered.

        A given order (``schedule=``, a CSV) is validated as written first, so errors name its own actions.
        Nothing changes when a check fails.
        """
        compute = compute.with_deps(self.pipe.deps())
        trains = any(a.kind.is_compute and a.kind.value != "F" for acts in compute.actions for a in acts)
        if trains and not generated:
            validate(compute)
        fuse_backward, fill = self._fuse_backward, generated and self.fill_bubbles
        if fuse_backward == "auto":  # fuse I+W into B only where it simulates faster under the class's costs
            compute, fused = fastest_form(compute, self.costs, gradless_stages=self.gradless_stages(),
                                          compact=fill, mixed=fill)
        else:
            compute = runtime_form(compute, self.gradless_stages(), fuse=bool(fuse_backward))
            fused = bool(fuse_backward)
        if fill and fuse_backward != "auto":  # W's into the gaps the costs predict
            compute = compact_w(compute, fit_costs(self.costs, compute.num_stages))
        check_placement(self.name, self.rank, self.stages, self.pipe.num_stages, compute,
                        getattr(self.transport, "group", None))
        if trains:
            validate(compute)
        eval_order = gen.forward_only(compute.stage_to_rank, self.n_microbatches).with_deps(self.pipe.deps())
        lowered, eval_lowered = lower(compute) if trains else None, lower(eval_order)
        self.schedule, self._eval_schedule = lowered, eval_lowered
        self.fused_backward = fused
        self._executors.clear()
        self._agreed = False

    def gradless_stages(self) -> list[int]:
        """Stages whose inputs need no gradient (the first, reading token ids): their backward is never split."""
        return [s for s, info in enumerate(self.pipe.stage_infos) if not any(m.requires_grad for m in info.input_meta)]

    @classmethod
    def placement(cls, num_ranks: int, stages_per_rank: int = 1) -> tuple[int, ...]:
        """Where this schedule puts stages: ``placement[s]`` is the rank of stage ``s``."""
        return loop_placement(num_ranks, stages_per_rank)

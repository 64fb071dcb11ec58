"""A lower bound on any execution of a schedule: the busiest rank's work plus the wait its first forward cannot avoid.

For rank ``r`` the step takes at least ``head_r + work_r + tail_r``:

* ``work_r``: the compute of every action the schedule gives rank ``r`` (one rank runs one action
  at a time), timed as :func:`~pippy.sim.simulate.simulate` times it: a forward takes ``split_f``
  on a stage with I actions and ``f`` on one whose backward runs whole;
* ``head_r``: micro-batch 0's forwards through the stages before rank ``r``'s first stage (nothing
  on rank ``r`` can start earlier);
* ``tail_r``: for a rank whose backward is not split, the backward chain from its first stage
  down to stage 0 after its last backward; zero when it has W's (they may overlap that chain).

Also at least one micro-batch's whole forward and backward path. Transfers count as free, so the
bound holds for any link. The gap to it is what a better order could still win.

    >>> from pippy.schedules.generators import make_schedule
    >>> from pippy.sim.cost import CostModel, StageCost
    >>> unit = CostModel.uniform(4, f=1, i=1, w=1)
    >>> lower_bound(make_schedule("1f1b", 4, 8), unit)      # rank 3: 3 forwards before, 24 of work, 3 B after
    33.0
"""

from __future__ import annotations

from pippy.schedules.ir import Kind, Schedule
from pippy.sim.cost import CostModel, StageCost

__all__ = ["lower_bound"]


def lower_bound(schedule: Schedule, costs: CostModel) -> float:
    """No execution of ``schedule`` under ``costs`` is shorter than this (see the module docstring)."""
    if costs.check().num_stages < schedule.num_stages:
        raise ValueError(f"lower_bound: cost model has {costs.num_stages} stages but schedule {schedule.name!r} has "
                         f"{schedule.num_stages}; use CostModel.rebin({schedule.num_stages}) or supply more stages")
    st = costs.stages
    p = schedule.num_ranks
    split = {a.stage for acts in schedule.actions for a in acts if a.kind is Kind.I}
    fwd = [c.forward_time(s in split) for s, c in enumerate(st)]  # as simulate times them: split_f where split
    ahead = [sum(fwd[:s]) for s in range(schedule.num_stages)]  # forwards before stage s, for one micro-batch
    cost = {Kind.F: lambda s: fwd[s], Kind.B: lambda s: st[s].b, Kind.I: lambda s: st[s].i, Kind.W: lambda s: st[s].w}
    best = 0.0
    for r in range(p):
        acts = [a for a in schedule.actions[r] if a.kind in cost]
        if not acts:
            continue
        mine = sorted({a.stage for a in acts})
        work = sum(cost[a.kind](a.stage) for a in acts)
        head = min(ahead[s] for s in mine)
        tail = 0.0
        if not any(s in split for s in mine):
            tail = min(sum(_back(st[q], q in split) for q in range(s)) for s in mine)
        best = max(best, head + work + tail)
    path = sum(fwd) + sum(_back(st[s], s in split) for s in range(1, schedule.num_stages)) + (st[0].w if 0 in split else st[0].b)
    return float(max(best, path))


def _back(c: StageCost, split: bool) -> float:
    """What a stage must still do for a micro-batch once its output gradient arrives: I if split, else B."""
    return float(c.i if split else c.b)

"""Static bubble filling: move each weight-gradient step (W) into the earliest idle gap it fits, by simulation.

A W feeds no other action, so a rank may run it anywhere after its own I. Generators place W's
from a coarse model (unit time steps; I and W later fused into one B), which leaves gaps where a
rank waits for a message while W's it could already run sit at the end of its program, holding
their micro-batch's activations and output gradients. :func:`compact_w` simulates the schedule
under the costs, finds the earliest gap (a rank idle before an action) that a pending W fits in
whole, moves that W there and simulates again, until no W fits anywhere:

* no action starts later (the moved W ends before the action after the gap started), so the
  step is never slower, and usually faster, since the rank's program ends sooner;
* a W only moves earlier, so no rank ever holds more memory;
* a W never passes a B or W of its own stage, so every parameter sums its micro-batch gradients
  in the same order: results are bitwise those of the schedule as generated;
* W's send nothing, so ranks that compacted differently still match each other's messages.

The runtime's bubble filler (:mod:`pippy.runtime.wfill`) does the same from measured waits, from
the second step on; compaction gives the first step, and every step whose waits are too short
to fill, the memory of a filled schedule.

    >>> from pippy.schedules.ir import Schedule, as_actions
    >>> from pippy.sim.cost import CostModel
    >>> s = Schedule("tail", [as_actions(["0F0", "0F1", "0I0", "0I1", "0W0", "0W1"]),
    ...                       as_actions(["1F0", "1F1", "1B0", "1B1"])], (0, 1), 2)
    >>> [str(a) for a in compact_w(s, CostModel.uniform(2)).actions[0]]
    ['0F0', '0F1', '0I0', '0W0', '0I1', '0W1']
"""

from __future__ import annotations

from dataclasses import replace

from pippy.schedules.ir import Action, Kind, Schedule
from pippy.sim.cost import CostModel
from pippy.sim.simulate import SimResult, simulate

__all__ = ["compact_w"]

_EPS = 1e-12
MAX_ACTIONS = 4000  # larger schedules are returned as they are (each pass simulates the whole step); the
# runtime's bubble filler still fills their waits from measured timings


def compact_w(schedule: Schedule, costs: CostModel, *, max_moves: int | None = None) -> Schedule:
    """``schedule`` (compute-only, as the runtime runs it) with W's moved into the idle gaps they fit.

    ``costs`` must cover the schedule's stages. ``max_moves`` bounds the work (default: four times
    the number of W's, more than any schedule here needs); the result is valid at every move.
    Returns ``schedule`` itself when nothing moves, and for schedules of more than ``MAX_ACTIONS``
    actions. "Never slower" holds in simulation under ``costs``: a W placed in a gap that is
    shorter on the real machine delays the action after it.

        >>> from pippy.schedules.zero_bubble import zbv
        >>> from pippy.schedules.lower import runtime_form
        >>> from pippy.sim.choose import default_costs
        >>> from pippy.sim.simulate import simulate
        >>> form, costs = runtime_form(zbv(2, 4)), default_costs(4)
        >>> simulate(form, costs).step_time, simulate(compact_w(form, costs), costs).step_time
        (24.5, 23.5)
    """
    if not any(a.kind is Kind.W for acts in schedule.actions for a in acts) or \
            sum(len(r) for r in schedule.actions) > MAX_ACTIONS:
        return schedule
    if any(a.kind.is_comm for acts in schedule.actions for a in acts):
        raise ValueError(
            f"compact_w: schedule {schedule.name!r} holds SEND/RECV actions; pass its compute-only form "
            "(schedule.compute_only()) and lower the result"
        )
    acts = [list(r) for r in schedule.actions]
    n_w = sum(a.kind is Kind.W for r in acts for a in r)
    budget = 4 * n_w if max_moves is None else max_moves
    res = simulate(schedule, costs)
    moved = 0
    while moved < budget:
        moves = _first_moves(acts, res, costs)[: budget - moved]
        if not moves:
            break
        # one move per rank at once: each moved W ends before the old start of the action after it,
        # so, by induction over the simulation, no action anywhere starts later
        for _, r, k, j in moves:
            acts[r].insert(k, acts[r].pop(j))
        moved += len(moves)
        res = simulate(replace(schedule, actions=[list(x) for x in acts]), costs)
    return schedule if not moved else replace(schedule, actions=acts)


def _first_moves(acts: list[list[Action]], res: SimResult, costs: CostModel) -> list[tuple[float, int, int, int]]:
    """Per rank, its earliest gap that a later W fits: (gap start time, rank, gap index, W index), earliest first."""
    out: list[tuple[float, int, int, int]] = []
    for r, ra in enumerate(acts):
        starts, ends = res._starts[r], res._ends[r]
        i_done: set[tuple[int, int]] = set()
        for k in range(len(ra)):
            a = ra[k]
            gap = starts[k] - ends[k - 1] if k else 0.0
            if gap > _EPS and a.kind is not Kind.W:
                j = _fitting_w(ra, k, gap, i_done, costs)
                if j is not None:
                    out.append((starts[k], r, k, j))
                    break
            if a.kind is Kind.I:
                i_done.add((a.stage, a.mb))
    return sorted(out)


def _fitting_w(ra: list[Action], k: int, gap: float, i_done: set[tuple[int, int]], costs: CostModel) -> int | None:
    """Index of the first W after ``k`` whose I ran before ``k``, that fits ``gap``, and passes no B/W of its stage."""
    blocked: set[int] = set()  # stages with a B or W between k and the candidate
    for j in range(k, len(ra)):
        a = ra[j]
        if a.kind is Kind.W and a.stage not in blocked and (a.stage, a.mb) in i_done \
                and costs.stages[a.stage].w <= gap + _EPS:
            return j
        if a.kind is Kind.B or a.kind is Kind.W:
            blocked.add(a.stage)
    return None

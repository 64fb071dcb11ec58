"""On transports that match in posting order (NCCL): when each receive is posted, so that no two ranks' orders cross.

NCCL runs a rank's sends and receives on one stream in the order they were posted, and a send
bigger than its buffers finishes only when its receive runs. Two ranks that each post a send
before the receive of the other's message wait for each other forever: in 1F1B for p = 2, rank 0
sends micro-batch 1's activations before it receives micro-batch 0's gradient, while rank 1 sends
that gradient before it receives those activations. The messages need one global order that
every rank posts in. :func:`receive_posts` takes it from a unit-time run of the lowered schedule
(sends ordered by when they run there) and, since a send cannot go out before its data is made,
moves receives earlier: each is posted before the first of the rank's messages that come after it.
A RECV fed by two ranks (a skip edge) is posted in two parts, one per sender.
That never moves a receive past the send it depends on: a message that comes earlier in the order
was sent before anything on this rank that comes later was run.

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> from pippy.schedules.generators import one_f_one_b
    >>> from pippy.schedules.lower import lower
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> pipe = pipeline(net, 2, (torch.ones(2, 2),), split_spec={"0": SplitPoint.END})
    >>> from pippy.runtime.plan import CommPlan
    >>> sched = lower(one_f_one_b(2, 2))
    >>> [str(a) for a in sched.actions[1]]
    ['1RECV_F0', '1F0', '1B0', '1SEND_B0', '1RECV_F1', '1F1', '1B1', '1SEND_B1']
    >>> plan = CommPlan(pipe.stage_infos, sched, 1, ordered=True)
    >>> plan.post_order   # (RECV, sending stage): 1RECV_F1 goes out before 1SEND_B0
    {0: [(0, 0)], 3: [(4, 0)]}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pippy.frontend.split import StageInfo
from pippy.schedules.ir import Action, Kind, Schedule
from pippy.schedules.validate import ScheduleError, unit_time_starts

if TYPE_CHECKING:  # the plan calls this module while it is being built
    from pippy.runtime.plan import CommPlan, Edge

__all__ = ["receive_posts"]


def receive_posts(plan: CommPlan, infos: Sequence[StageInfo], schedule: Schedule, rank: int
                  ) -> dict[int, list[tuple[int, int]]]:
    """Where ``rank`` posts the receives of the lowered ``schedule`` (its messages per ``plan``): ``{i: [(j, end),
    ...]}`` posts, just before action ``i`` runs and in list order, the receives of RECV ``j`` whose other end is stage
    ``end`` (a RECV fed by stages on two ranks, a skip edge, is posted in two parts, each where its sender's place in
    the order says). Every message of every RECV is named once (see the module). A schedule the unit-time run cannot
    order (it fails validation) keeps each RECV whole in place."""
    acts = schedule.actions[rank]
    groups = {j: _ends(plan, infos, a) for j, a in enumerate(acts) if a.kind in (Kind.RECV_F, Kind.RECV_B)}
    try:
        starts = unit_time_starts(schedule)
    except ScheduleError:
        return {j: [(j, end) for end in ends] for j, ends in groups.items() if ends}
    when = {a: (starts[r][t], r, t) for r, row in enumerate(schedule.actions) for t, a in enumerate(row)}
    keyed: list[tuple[tuple[int, int, int], int, int | None]] = []  # (order key, position, receive's other end)
    for j, a in enumerate(acts):
        if j in groups:
            sent = Kind.SEND_F if a.kind is Kind.RECV_F else Kind.SEND_B
            keyed.extend((when[Action(end, sent, a.mb)], j, end) for end in groups[j])
        elif (a.kind is Kind.SEND_F and plan.send_f[a.stage]) or (a.kind is Kind.SEND_B and plan.send_b[a.stage]):
            keyed.append((when[a], j, None))
    keyed.sort(key=lambda x: (x[0], x[1], -1 if x[2] is None else x[2]))
    at: dict[tuple[int, int], int] = {}
    limit = len(acts)
    for _, j, end in reversed(keyed):  # a receive goes out before whatever comes after it in the order
        limit = j if end is None else min(j, limit)
        if end is not None:
            at[(j, end)] = limit
    out: dict[int, list[tuple[int, int]]] = {}
    for _, j, end in keyed:
        if end is not None:
            out.setdefault(at[(j, end)], []).append((j, end))
    return out


def _ends(plan: CommPlan, infos: Sequence[StageInfo], a: Action) -> list[int]:
    """The stages on other ranks whose messages RECV ``a`` takes (a constant input that never changes is not sent)."""
    if a.kind is Kind.RECV_F:
        return sorted({e.src for e in plan.recv_f[a.stage] if _sent(infos, e)})
    return sorted({e.dst for e in plan.recv_b[a.stage]})


def _sent(infos: Sequence[StageInfo], e: Edge) -> bool:
    """Whether edge ``e``'s forward value travels (a constant that never changes is not sent)."""
    meta = infos[e.dst].input_meta[e.k]
    return bool(meta.is_tensor or meta.varies)

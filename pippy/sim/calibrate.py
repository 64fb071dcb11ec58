"""Calibrate a cost model from a traced real step: each stage's F, B, I and W take what they took in the run.

Profiling times each stage alone; in a real step the ranks share cores, caches and memory
bandwidth, and the machine's speed drifts, so the profile under-predicts (GPT-2 on this 2-core
machine: -18% to -30%). A traced step (``trace=True``; its ``last_timeline``) measures every action
under the very contention of the run. :func:`calibrate` keeps the profile's bandwidth and byte
sizes and takes each (stage, kind)'s median traced duration; a kind the trace did not run (W in a 1F1B
trace) is scaled like the kinds it did run on that stage. The link latency, too, is what the run
saw (:func:`traced_latency`): under contention a message waits for its sender's and receiver's
communication threads to get a core, far longer than an idle ping-pong. So is the runtime's own
time per compute action (:func:`traced_overhead`: posting sends and receives, bookkeeping), which
no profile of a stage sees. The simulator then predicts the next steps, or another schedule, from
costs that include the contention.

    >>> from pippy.schedules.generators import one_f_one_b
    >>> from pippy.sim.simulate import simulate
    >>> sched = one_f_one_b(2, 4)
    >>> profiled = CostModel.uniform(2, f=1.0, i=1.0, w=1.0)
    >>> real = simulate(sched, CostModel.uniform(2, f=1.5, i=1.5, w=1.5)).timeline   # a run 1.5x slower
    >>> cal = calibrate(profiled, real)
    >>> cal.stages[0].f, cal.stages[0].b, cal.stages[0].i       # I and W scaled like the measured B
    (1.5, 3.0, 1.5)
    >>> simulate(sched, cal).step_time == real.step_time
    True
"""

from __future__ import annotations

import statistics
from dataclasses import replace

from pippy.schedules.ir import Kind
from pippy.sim.clocks import PAIR as _PAIR
from pippy.sim.clocks import message_pairs
from pippy.sim.cost import CostModel, StageCost
from pippy.sim.timeline import Timeline

__all__ = ["calibrate", "traced_latency", "traced_overhead"]


def traced_latency(costs: CostModel, timeline: Timeline) -> float | None:
    """The median latency of the messages a traced step waited for; None when it waited for none.

    A sample is a receive that was already waiting when its message was posted: from the SEND's
    start to the RECV's end, less the bytes' transfer time at ``costs.bandwidth``. The sender of a
    forward message is the nearest lower stage on another rank that sent that micro-batch (the
    nearest higher one for gradients, :func:`pippy.sim.clocks.message_pairs`). Times of different ranks
    share the trace's origin (:func:`pippy.runtime.ranks.gather_trace` puts them on one clock).

        >>> from pippy.schedules.ir import Action
        >>> from pippy.sim.timeline import Event
        >>> ev = [Event(0, Action.parse("0SEND_F0"), 1.0, 1.0), Event(1, Action.parse("1RECV_F0"), 0.5, 1.25)]
        >>> traced_latency(CostModel.uniform(2, f=1.0, i=1.0, w=1.0), Timeline(ev, 2))
        0.25
    """
    samples = []
    for snd, ev in message_pairs(timeline):
        s = ev.action.stage
        forward = snd.action.kind is Kind.SEND_F
        if ev.start > snd.start:
            continue  # the message was posted before this rank began to wait: its wait says nothing of the latency
        src = snd.action.stage if forward else s  # the stage whose output (or output's gradient) it carries
        c = costs.stages[src] if src < costs.num_stages else None
        nbytes = 0.0 if c is None else (c.send_bytes if forward else c.grad_out_bytes)
        samples.append(max(0.0, ev.end - snd.start - (costs.transfer_time(nbytes) - costs.latency)))
    return statistics.median(samples) if samples else None


def traced_overhead(timeline: Timeline) -> float | None:
    """The runtime's own seconds per compute action in a traced step (median over ranks), or None.

    None when the trace has no compute action, or has several ranks but no SEND/RECV events (a
    compute-only timeline, e.g. a simulated one: its gaps are waits, not overhead).

    On each rank: the span from its first event's start to its last event's end, less the time
    covered by compute actions and receive waits, divided by the compute actions whose overhead lies
    inside that span (all but the last event, when that is a compute action). What remains is
    the executor's work between them: posting sends (a SEND event is its posting) and receives,
    freeing, bookkeeping.

        >>> from pippy.schedules.ir import Action
        >>> from pippy.sim.timeline import Event
        >>> ev = [Event(0, Action.parse("0F0"), 0.0, 1.0), Event(0, Action.parse("0SEND_F0"), 1.0, 1.25),
        ...       Event(0, Action.parse("0RECV_B0"), 1.5, 3.0), Event(0, Action.parse("0B0"), 3.0, 4.0)]
        >>> traced_overhead(Timeline(ev, 1))   # 0.25 sending, 0.25 before the wait: after 0F0, inside the span
        0.5
    """
    if timeline.num_ranks > 1 and not any(e.action.kind.is_comm for e in timeline.events):
        return None
    per_rank = []
    for r in range(timeline.num_ranks):
        ev = [e for e in timeline.events if e.rank == r]
        n = sum(1 for e in ev if e.action.kind.is_compute)
        if not n:
            continue
        covered, reach = 0.0, -float("inf")  # union of compute and wait intervals (a filler's W runs inside a wait)
        for e in sorted((e for e in ev if e.action.kind.is_compute or e.action.kind in _PAIR), key=lambda e: e.start):
            lo = max(e.start, reach)
            if e.end > lo:
                covered += e.end - lo
            reach = max(reach, e.end)
        span = max(e.end for e in ev) - min(e.start for e in ev)
        last = max(ev, key=lambda e: e.end)
        # the overhead after a rank's last action, when that is a compute one, lies outside its span
        per_rank.append(max(0.0, span - covered) / max(1, n - (1 if last.action.kind.is_compute else 0)))
    return statistics.median(per_rank) if per_rank else None


def calibrate(costs: CostModel, timeline: Timeline, *, links: bool = True) -> CostModel:
    """``costs`` with every stage's compute times replaced by their median durations in ``timeline``.

    The timeline's F of a stage whose backward it splits (it has I's) is the tapped forward
    (``split_f``), else the plain one (``f``); B is the one-pass backward (``fused_b``). Kinds
    absent from the trace keep the profile's value times the stage's measured/profiled ratio of
    the kinds present (1 when none are).
    Pass the trace of a training step: an ``eval()`` trace's forwards run without autograd and
    are faster than a training F. Stages beyond ``costs.num_stages`` in the trace are ignored.
    With ``links`` the latency becomes :func:`traced_latency` (kept when the step waited for no
    message); bandwidth and byte sizes stay the profile's. The runtime's overhead per compute action
    becomes :func:`traced_overhead` (kept when the trace has no compute action).
    """
    seen: dict[tuple[int, Kind], list[float]] = {}
    for ev in timeline.events:
        if ev.action.kind.is_compute:
            seen.setdefault((ev.action.stage, ev.action.kind), []).append(ev.duration)
    out: list[StageCost] = []
    for s, c in enumerate(costs.stages):
        med = {k: statistics.median(v) for (st, k), v in seen.items() if st == s}
        split = Kind.I in med
        prof = {Kind.F: c.forward_time(split), Kind.B: c.b, Kind.I: c.i, Kind.W: c.w}
        ratios = [med[k] / prof[k] for k in med if prof[k] > 0]
        scale = statistics.median(ratios) if ratios else 1.0
        new = {k: med.get(k, prof[k] * scale) for k in prof}
        f_plain = new[Kind.F] if not split else c.f * (new[Kind.F] / prof[Kind.F] if prof[Kind.F] > 0 else scale)
        f_split = new[Kind.F] if split else c.forward_time(True) * (new[Kind.F] / prof[Kind.F] if prof[Kind.F] else scale)
        out.append(replace(c, f=f_plain, split_f=f_split, i=new[Kind.I], w=new[Kind.W], fused_b=new[Kind.B]))
    lat = traced_latency(costs, timeline) if links else None
    ovh = traced_overhead(timeline)
    return replace(costs, stages=out, latency=costs.latency if lat is None else lat,
                   overhead=costs.overhead if ovh is None else ovh)

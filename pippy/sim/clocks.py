"""One time base for the ranks of a traced step: match each RECV with its SEND, shift ranks until every message is causal.

Each rank times its events on its own clock. :func:`pippy.runtime.ranks.gather_trace` first puts them on
the wall clock (exact on one host); ranks on hosts whose wall clocks disagree can still be off by
milliseconds, so :func:`make_causal` then moves ranks later, by the least amounts, until no receive
ends before its message's send started.

    >>> from pippy.schedules.ir import Action
    >>> ev = [Event(0, Action.parse("0SEND_F0"), 1.0, 1.0), Event(1, Action.parse("1RECV_F0"), 0.25, 0.5)]
    >>> tl, shifts = make_causal(Timeline(ev, 2))
    >>> shifts, [(str(e.action), e.start, e.end) for e in tl.events]
    ([0.0, 0.5], [('0SEND_F0', 1.0, 1.0), ('1RECV_F0', 0.75, 1.0)])
"""

from __future__ import annotations

from pippy.schedules.ir import Kind
from pippy.sim.timeline import Event, Timeline

__all__ = ["PAIR", "make_causal", "message_pairs"]

PAIR = {Kind.RECV_F: Kind.SEND_F, Kind.RECV_B: Kind.SEND_B}
"""The SEND kind that each RECV kind receives from."""


def message_pairs(timeline: Timeline) -> list[tuple[Event, Event]]:
    """``(send, recv)`` for every RECV of the trace whose SEND is in it, on another rank.

    The sender of a forward message is the nearest lower stage on another rank that sent that
    micro-batch (the nearest higher one for gradients).

        >>> from pippy.schedules.ir import Action
        >>> ev = [Event(0, Action.parse("0SEND_F0"), 1.0, 1.0), Event(1, Action.parse("1RECV_F0"), 0.5, 1.25)]
        >>> [(str(s.action), str(r.action)) for s, r in message_pairs(Timeline(ev, 2))]
        [('0SEND_F0', '1RECV_F0')]
    """
    sends: dict[tuple[Kind, int], list[Event]] = {}
    for ev in timeline.events:
        if ev.action.kind in (Kind.SEND_F, Kind.SEND_B):
            sends.setdefault((ev.action.kind, ev.action.mb), []).append(ev)
    pairs = []
    for ev in timeline.events:
        kind = PAIR.get(ev.action.kind)
        if kind is None:
            continue
        forward = kind is Kind.SEND_F
        s = ev.action.stage
        cands = [e for e in sends.get((kind, ev.action.mb), ()) if e.rank != ev.rank
                 and (e.action.stage < s if forward else e.action.stage > s)]
        if cands:
            pairs.append((min(cands, key=lambda e: abs(e.action.stage - s)), ev))
    return pairs


def make_causal(timeline: Timeline) -> tuple[Timeline, list[float]]:
    """The timeline with ranks moved later so that each receive ends no earlier than its send starts.

    Returns it and each rank's shift in seconds (all 0 when the trace was causal). The shifts are the
    least that satisfy every message (a longest-path relaxation over the ranks); when the messages
    contradict each other (a cycle that no shift satisfies) it stops after ``num_ranks`` rounds.

        >>> tl = Timeline([], 2)
        >>> make_causal(tl)[1]
        [0.0, 0.0]
    """
    n = timeline.num_ranks
    shift = [0.0] * n
    need = [(s.rank, r.rank, s.start - r.end) for s, r in message_pairs(timeline)
            if 0 <= s.rank < n and 0 <= r.rank < n]
    for _ in range(max(1, n)):
        changed = False
        for a, b, c in need:  # shift[b] - shift[a] >= c
            if shift[b] - shift[a] < c:
                shift[b] = shift[a] + c
                changed = True
        if not changed:
            break
    if not any(shift):
        return timeline, shift
    events = [Event(e.rank, e.action, e.start + shift[e.rank], e.end + shift[e.rank])
              if 0 <= e.rank < n else e for e in timeline.events]
    return Timeline(events, n, timeline.name), shift

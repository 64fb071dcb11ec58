"""Zero-bubble schedules with split backward (I = input grad, W = weight grad): ZB-H1/H2, ZB-V, DualPipeV.

After Qi et al., "Zero Bubble Pipeline Parallelism" (arXiv 2401.10241) and DeepSeek's DualPipe.
I carries the gradient upstream; W (the weight gradient) has no consumer, so it can wait and
fill a bubble. All unit-time figures below take F = I = W = 1.

    >>> s = zb_h1(2, 3)
    >>> [str(a) for a in s.actions[1]]
    ['1F0', '1I0', '1F1', '1I1', '1W0', '1F2', '1I2', '1W1', '1W2']
"""

from __future__ import annotations

from collections import deque

from pippy.schedules._checks import bad_args, check_pm
from pippy.schedules.ir import Action, Kind, Schedule, v_placement

__all__ = ["ZBV_ORDERS", "dualpipev", "zb_h1", "zb_h2", "zbv"]

F, IG, W = Kind.F, Kind.I, Kind.W  # IG: input gradient (a bare `I` trips linters)


def zb_h1(p: int, m: int) -> Schedule:
    """ZB-H1: 1F1B with split backward, W's delayed to fill the cool-down; 1F1B's peak memory.

    Rank ``r`` runs ``min(p-1-r, m)`` warm-up forwards, then F, I pairs; each W trails its I
    by ``r`` micro-batches, so every rank holds at most ``p`` micro-batches between F and W — the
    same peak as 1F1B's rank 0. Since only I is on the critical path, gradients reach the early
    ranks sooner and the late ranks' deferred W's fill the cool-down: the bubble drops to about
    a third of 1F1B's. Stage ``s`` on rank ``s``. Constraints: ``p >= 1``, ``m >= 1``.

    ``zb_h1(3, 4)``::

        rank 0: 0F0 0F1 0F2 0I0 0W0 0F3 0I1 0W1 0I2 0W2 0I3 0W3
        rank 1: 1F0 1F1 1I0 1F2 1I1 1W0 1F3 1I2 1W1 1I3 1W2 1W3
        rank 2: 2F0 2I0 2F1 2I1 2F2 2I2 2W0 2F3 2I3 2W1 2W2 2W3

        >>> sum(a.kind is Kind.W for a in zb_h1(3, 4).actions[0])
        4
    """
    check_pm("zb_h1", p, m)
    acts: list[list[Action]] = []
    for r in range(p):
        warm = min(p - 1 - r, m)
        row = [Action(r, F, i) for i in range(warm)]
        lag: deque[int] = deque()
        for k in range(m):
            if warm + k < m:
                row.append(Action(r, F, warm + k))
            row.append(Action(r, IG, k))
            lag.append(k)
            if len(lag) > r:
                row.append(Action(r, W, lag.popleft()))
        row += [Action(r, W, k) for k in lag]
        acts.append(row)
    return Schedule("zb_h1", acts, tuple(range(p)), m)


def zb_h2(p: int, m: int) -> Schedule:
    """ZB-H2: extra warm-up forwards and reshuffled W's so that, with F = I = W, no rank idles.

    Rank ``r`` starts with ``2(p-1-r)+1`` forwards — exactly enough to fill the time until its
    first I arrives — then runs I whenever one is ready, else F while fewer than ``2p-1``
    micro-batches sit between F and W, else the oldest W. With unit times each rank is busy
    from ``r`` to ``r + 3m`` (a parallelogram, zero bubble inside it) for ``m >= 2p-1``.
    Peak memory ``2p-1`` micro-batches (about twice 1F1B). Built by :func:`_greedy`. Stage ``s``
    on rank ``s``. Constraints: ``p >= 1``, ``m >= 1`` (fewer micro-batches run, with bubbles).

    ``zb_h2(2, 4)``::

        rank 0: 0F0 0F1 0F2 0I0 0W0 0I1 0F3 0I2 0W1 0W2 0I3 0W3
        rank 1: 1F0 1I0 1F1 1I1 1F2 1I2 1W0 1F3 1I3 1W1 1W2 1W3

        >>> [str(a) for a in zb_h2(2, 2).actions[0]]
        ['0F0', '0F1', '0I0', '0W0', '0I1', '0W1']
    """
    check_pm("zb_h2", p, m)
    return _greedy("zb_h2", p, m, tuple(range(p)), 2 * p - 1, whole_backward=False)


def _greedy(name: str, p: int, m: int, placement: tuple[int, ...], cap: int, *, whole_backward: bool) -> Schedule:
    """Build a schedule by running it: a unit-time list scheduler with zero-bubble priorities.

    Every time unit each rank starts one ready action: the oldest ready I (ties: the later
    stage), else a ready F while fewer than ``cap`` micro-batch chunks sit between F and W on
    the rank (the later stage first, then the oldest micro-batch), else its oldest pending W.
    With ``whole_backward``, while the rank still has forwards to run, an I is followed at once
    by its own W (the runtime fuses the pair into one cheaper B) and a finished backward by a
    forward when one is ready (1F1B's alternation); only the cool-down splits, with W's filling
    the gaps. The order each rank ran in is the schedule; it cannot deadlock, since this run
    completes.
    """
    n = len(placement)
    deps = {s: ((s - 1,) if s else ()) for s in range(n)}
    finish: dict[tuple[int, int, Kind], int] = {}
    next_f = [0] * n
    next_i = [0] * n
    pending_w: list[deque[tuple[int, int]]] = [deque() for _ in range(p)]
    in_flight = [0] * p
    acts: list[list[Action]] = [[] for _ in range(p)]
    local = [[s for s in range(n) if placement[s] == r] for r in range(p)]
    total, t = 3 * n * m, 0
    while len(finish) < total:
        started: list[tuple[int, Action]] = []
        for r in range(p):
            def done(s: int, i: int, k: Kind, now: int = t) -> bool:
                return finish.get((s, i, k), now + 1) <= now

            ready_i = [(next_i[s], -s) for s in local[r] if next_i[s] < m and done(s, next_i[s], F)
                       and (s == n - 1 or done(s + 1, next_i[s], IG))]
            ready_f = [(-s, next_f[s]) for s in local[r] if next_f[s] < m
                       and all(done(d, next_f[s], F) for d in deps[s])]
            last = acts[r][-1] if acts[r] else None
            steady = whole_backward and last is not None and any(next_f[s] < m for s in local[r])
            if steady and last is not None and last.kind is IG:
                pending_w[r].remove((last.stage, last.mb))
                a = Action(last.stage, W, last.mb)
            elif steady and last is not None and last.kind is W and ready_f and in_flight[r] < cap:
                neg_s, i = min(ready_f)
                a = Action(-neg_s, F, i)
            elif ready_i:
                i, neg_s = min(ready_i)
                a = Action(-neg_s, IG, i)
            elif ready_f and in_flight[r] < cap:
                neg_s, i = min(ready_f)
                a = Action(-neg_s, F, i)
            elif pending_w[r]:
                s, i = pending_w[r].popleft()
                a = Action(s, W, i)
            else:
                continue
            started.append((r, a))
        if not started:
            raise RuntimeError(f"{name}: list scheduling stalled at t={t} (p={p}, m={m}); please report")
        for r, a in started:
            finish[(a.stage, a.mb, a.kind)] = t + 1
            acts[r].append(a)
            if a.kind is F:
                next_f[a.stage] += 1
                in_flight[r] += 1
            elif a.kind is IG:
                next_i[a.stage] += 1
                pending_w[r].append((a.stage, a.mb))
            else:
                in_flight[r] -= 1
        t += 1
    return Schedule(name, acts, placement, m)


ZBV_ORDERS = ("whole", "split")
"""The orders :func:`zbv` builds; :func:`pippy.sim.choose.zbv_for_costs` picks the faster."""


def zbv(p: int, m: int, order: str = "whole") -> Schedule:
    """ZB-V: V placement (rank ``r`` holds stages ``r`` and ``2p-1-r``) with split backward.

    A unit-time list schedule (see :func:`_greedy`) keeping at most ``2p`` stage-micro-batches
    live on a rank between F and W (1F1B's activation memory, since a V stage is half a 1F1B
    stage), in one of two orders:

    * ``"whole"``: while a rank still has forwards to run it alternates forwards with whole
      backwards (I directly followed by its W, which the runtime runs as one cheaper B); only
      the cool-down splits, I's first, W's filling the gaps;
    * ``"split"``: every backward split, I first, W's deferred to fill every gap (zero bubble when
      F = I = W and a split costs nothing).

    Which is faster depends on the costs: on this project's CPU runtime a split backward costs
    10-35% more than a whole one (GPT-2 block: I + W 46 ms, B 34 ms), and with F = I = W = 1,
    B = 1.5 *split* wins only for few micro-batches (about ``2 <= m <= p``), *whole* elsewhere.
    :func:`pippy.sim.choose.zbv_for_costs` simulates both as the runtime runs them and returns the
    faster (``ScheduleZBV`` and the command line use it). Constraints: ``p >= 1``, ``m >= 1``.

        >>> s = zbv(2, 2)
        >>> s.stage_to_rank, [str(a) for a in s.actions[1]][:5]
        ((0, 1, 1, 0), ['1F0', '2F0', '1F1', '2F1', '2I0'])
        >>> [str(a) for a in zbv(2, 4).actions[0]][:7]
        ['0F0', '0F1', '0F2', '3F0', '3I0', '3W0', '3F1']
        >>> [str(a) for a in zbv(2, 4, "split").actions[1]][:7]
        ['1F0', '2F0', '1F1', '2F1', '2I0', '1I0', '2W0']
    """
    check_pm("zbv", p, m)
    if not isinstance(order, str) or order not in ZBV_ORDERS:
        raise bad_args(
            "zbv", f"order={order!r}", "order 'whole' or 'split'",
            "pass order='whole' or order='split'; to choose the order by costs, call "
            "pippy.sim.choose.zbv_for_costs(p, m, costs)",
        )
    return _greedy("zbv", p, m, v_placement(p), 2 * p, whole_backward=order == "whole")


def dualpipev(p: int, m: int) -> Schedule:
    """DualPipeV: DeepSeek's DualPipe cut in half onto a V placement, with split backward.

    Rank ``r`` holds stage ``r`` (chunk 0) and ``2p-1-r`` (chunk 1). Phases per rank, with
    ``a = p-1-r``:

    1. ``2a`` forwards of chunk 0;
    2. ``r+1`` pairs F chunk 0, F chunk 1;
    3. ``a`` times: I, W of chunk 1, then F chunk 1;
    4. steady, ``m-2p+r+1`` times: F chunk 0 + I/W chunk 1, then F chunk 1 + I/W chunk 0 — each
       pair is what DualPipe overlaps (one chunk's compute hides the other's communication);
    5. ``a`` times: I, W chunk 1, then F chunk 1 + I, W chunk 0;
    6. ``r+1`` times: I chunk 1, I chunk 0, their W's deferred;
    7. ``a`` times: one deferred W, then I chunk 0 (its W deferred);
    8. the remaining deferred W's.

    Peak memory about ``2p`` chunk activations on rank 0 (1F1B's). Constraints: ``p >= 1`` and
    ``m >= 2p-1`` (every rank's warm-up must fit; DeepSeek's reference asks ``m >= 2p``). With
    F = I = W each rank is busy from ``r`` to ``r + 6m`` (zero bubble inside the parallelogram).

        >>> s = dualpipev(2, 4)
        >>> [str(a) for a in s.actions[1]][:6]
        ['1F0', '2F0', '1F1', '2F1', '1F2', '2I0']
    """
    check_pm("dualpipev", p, m)
    if m < 2 * p - 1:
        raise bad_args(
            "dualpipev", f"p={p}, m={m}", f"m >= 2p-1 = {2 * p - 1} micro-batches (every rank needs its warm-up)",
            f"use at least {2 * p - 1} micro-batches, or zbv / zb_h1, which take any m",
        )
    return Schedule("dualpipev", [_dualpipev_rank(p, r, m) for r in range(p)], v_placement(p), m)


def _dualpipev_rank(p: int, r: int, m: int) -> list[Action]:
    """Rank ``r``'s DualPipeV program (phases 1-8 of :func:`dualpipev`)."""
    c0, c1, a = r, 2 * p - 1 - r, p - 1 - r
    nxt = {(c0, F): 0, (c1, F): 0, (c0, IG): 0, (c1, IG): 0}
    row: list[Action] = []
    deferred: deque[Action] = deque()

    def do(stage: int, kind: Kind, w: str = "") -> None:
        # w: "" no W (forwards), "now" W right after the I, "later" queue the W
        i = nxt[(stage, kind)]
        nxt[(stage, kind)] += 1
        row.append(Action(stage, kind, i))
        if w == "now":
            row.append(Action(stage, W, i))
        elif w == "later":
            deferred.append(Action(stage, W, i))

    for _ in range(2 * a):
        do(c0, F)
    for _ in range(r + 1):
        do(c0, F)
        do(c1, F)
    for _ in range(a):
        do(c1, IG, "now")
        do(c1, F)
    for _ in range(m - 2 * p + r + 1):
        do(c0, F)
        do(c1, IG, "now")
        do(c1, F)
        do(c0, IG, "now")
    for _ in range(a):
        do(c1, IG, "now")
        do(c1, F)
        do(c0, IG, "now")
    for _ in range(r + 1):
        do(c1, IG, "later")
        do(c0, IG, "later")
    for _ in range(a):
        row.append(deferred.popleft())
        do(c0, IG, "later")
    return row + list(deferred)

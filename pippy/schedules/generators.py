"""Schedule generators: pure functions ``(p ranks, m micro-batches) -> compute-only Schedule``.

Each returns F/B/I/W actions only; :func:`pippy.schedules.lower.lower` adds the SEND/RECV.
The zero-bubble family (I/W split backward) lives in :mod:`pippy.schedules.zero_bubble`.

    >>> print(make_schedule("1f1b", 2, 3))
    1f1b: 2 ranks, 2 stages, 3 microbatches
    rank 0: 0F0 0F1 0B0 0F2 0B1 0B2
    rank 1: 1F0 1B0 1F1 1B1 1F2 1B2
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pippy.schedules._checks import bad_args, check_pm, check_v
from pippy.schedules.ir import Action, Kind, Schedule, loop_placement
from pippy.schedules.zero_bubble import dualpipev, zb_h1, zb_h2, zbv

__all__ = [
    "SCHEDULES",
    "dualpipev",
    "forward_only",
    "gpipe",
    "interleaved_1f1b",
    "interleaved_zb",
    "looped_bfs",
    "make_schedule",
    "one_f_one_b",
    "zb_h1",
    "zb_h2",
    "zbv",
]

F, B = Kind.F, Kind.B


def gpipe(p: int, m: int) -> Schedule:
    """GPipe: every rank runs all forwards, then all backwards in reverse micro-batch order.

    Stage ``s`` on rank ``s``. Backward goes ``m-1 … 0`` as in GPipe / torchgpipe, where autograd
    unwinds the last micro-batch first. Constraints: ``p >= 1``, ``m >= 1``. Peak memory: ``m``
    micro-batches of activations on every rank.

    The table for ``gpipe(3, 4)`` (asserted in the tests)::

        rank 0: 0F0 0F1 0F2 0F3 0B3 0B2 0B1 0B0
        rank 1: 1F0 1F1 1F2 1F3 1B3 1B2 1B1 1B0
        rank 2: 2F0 2F1 2F2 2F3 2B3 2B2 2B1 2B0

        >>> [str(a) for a in gpipe(2, 2).actions[1]]
        ['1F0', '1F1', '1B1', '1B0']
    """
    check_pm("gpipe", p, m)
    acts = [[Action(r, F, i) for i in range(m)] + [Action(r, B, i) for i in reversed(range(m))] for r in range(p)]
    return Schedule("gpipe", acts, tuple(range(p)), m)


def _one_f_one_b_order(p: int, r: int, m: int) -> list[tuple[Kind, int]]:
    """Rank ``r``'s 1F1B program as (F or B, micro-batch)."""
    warm = min(p - 1 - r, m)
    order = [(F, i) for i in range(warm)]
    for k in range(m - warm):
        order += [(F, warm + k), (B, k)]
    return order + [(B, i) for i in range(m - warm, m)]


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B (PipeDream-flush): warm-up forwards, then one forward one backward, then cool-down.

    Rank ``r`` runs ``min(p-1-r, m)`` warm-up forwards, alternates F/B, then finishes the
    backwards. Stage ``s`` on rank ``s``. Constraints: ``p >= 1``, ``m >= 1`` (``m < p`` works; it
    is then GPipe-like). Peak memory: ``min(p-r, m)`` micro-batches on rank ``r``.

    The table for ``one_f_one_b(3, 4)`` (asserted in the tests)::

        rank 0: 0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3
        rank 1: 1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3
        rank 2: 2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3

        >>> [str(a) for a in one_f_one_b(2, 2).actions[0]]
        ['0F0', '0F1', '0B0', '0B1']
    """
    check_pm("1f1b", p, m)
    acts = [[Action(r, k, i) for k, i in _one_f_one_b_order(p, r, m)] for r in range(p)]
    return Schedule("1f1b", acts, tuple(range(p)), m)


def interleaved_1f1b(p: int, m: int, v: int = 2) -> Schedule:
    """Interleaved 1F1B (Megatron-LM): ``v`` stages per rank, loop placement, 1F1B over chunks.

    Stage ``s`` on rank ``s % p``; rank ``r`` holds stages ``r, r+p, …, r+(v-1)p``. Micro-batches
    go in ``max(1, m // p)`` consecutive rounds whose sizes differ by at most one (``p`` each when
    ``p`` divides ``m``, as in Megatron): for each round, the forwards of chunk 0 for the round's
    micro-batches, then chunk 1, …; backwards likewise from the last chunk down. Rank ``r`` runs
    ``(v-1)·g + 2(p-1-r)`` warm-up forwards (``g`` = size of the first round, capped at ``v·m``),
    then alternates one forward, one backward, then drains the backwards.

    Constraints: ``p >= 1``, ``m >= 1``, ``v >= 1``. Unlike Megatron, ``m`` need not be a multiple
    of ``p`` and ``m < p`` works (rounds then hold ``>= p`` micro-batches, or all ``m``); this
    was checked deadlock-free for p <= 8, v <= 4, m <= 40. ``v == 1`` is plain 1F1B.

    The table for ``interleaved_1f1b(2, 4, v=2)`` (stages 0, 2 on rank 0; 1, 3 on rank 1)::

        rank 0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3
        rank 1: 1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3

        >>> interleaved_1f1b(2, 4).stage_to_rank
        (0, 1, 0, 1)
    """
    check_pm("interleaved_1f1b", p, m)
    check_v("interleaved_1f1b", v)
    if v == 1:
        base = one_f_one_b(p, m)
        return Schedule("interleaved_1f1b", base.actions, base.stage_to_rank, m)
    n_rounds = max(1, m // p)  # rounds of >= p micro-batches (sizes differ by at most one)
    cuts = [k * (m // n_rounds) + min(k, m % n_rounds) for k in range(n_rounds + 1)]
    rounds = [range(cuts[k], cuts[k + 1]) for k in range(n_rounds)]
    fwd = [(c, i) for rnd in rounds for c in range(v) for i in rnd]
    bwd = [(c, i) for rnd in rounds for c in reversed(range(v)) for i in rnd]
    acts: list[list[Action]] = []
    for r in range(p):
        warm = min(v * m, (v - 1) * len(rounds[0]) + 2 * (p - 1 - r))
        order = [(F, *fwd[k]) for k in range(warm)]
        for k in range(v * m - warm):
            order += [(F, *fwd[warm + k]), (B, *bwd[k])]
        order += [(B, *bwd[k]) for k in range(v * m - warm, v * m)]
        acts.append([Action(c * p + r, kind, i) for kind, c, i in order])
    return Schedule("interleaved_1f1b", acts, loop_placement(p, v), m)


def interleaved_zb(p: int, m: int, v: int = 2) -> Schedule:
    """Interleaved zero bubble: interleaved 1F1B with each B split into I and a deferred W (ZB-H1's rule).

    The order of interleaved 1F1B (``v`` stages per rank, stage ``s`` on rank ``s % p``) with each
    backward cut into I (input gradient, on the critical path) and W (weight gradient). On rank
    ``r`` each W trails its I by ``r`` I's, as in ZB-H1, and the last ones fill the cool-down:
    gradients reach the earlier ranks sooner, and rank ``r`` holds at most ``r`` extra
    micro-batches, which keeps every rank at or under rank 0's interleaved peak. ``v == 1`` is
    ZB-H1's order. PyTorch's pipelining package calls its variant ``ScheduleInterleavedZeroBubble``.

    The table for ``interleaved_zb(2, 4, v=2)``::

        rank 0: 0F0 0F1 2F0 2F1 0F2 2I0 2W0 0F3 2I1 2W1 2F2 0I0 0W0 2F3 0I1 0W1 2I2 2W2 2I3 2W3 0I2 0W2 0I3 0W3
        rank 1: 1F0 1F1 3F0 3I0 3F1 3I1 3W0 1F2 1I0 3W1 1F3 1I1 1W0 3F2 3I2 1W1 3F3 3I3 3W2 1I2 3W3 1I3 1W2 1W3

        >>> sum(a.kind is Kind.W for row in interleaved_zb(2, 4).actions for a in row)
        16
    """
    check_pm("interleaved_zb", p, m)
    check_v("interleaved_zb", v)
    base = interleaved_1f1b(p, m, v)
    acts: list[list[Action]] = []
    for r, row in enumerate(base.actions):
        out: list[Action] = []
        lag: deque[Action] = deque()
        for a in row:
            if a.kind is not B:
                out.append(a)
                continue
            out.append(Action(a.stage, Kind.I, a.mb))
            lag.append(Action(a.stage, Kind.W, a.mb))
            if len(lag) > r:
                out.append(lag.popleft())
        acts.append(out + list(lag))
    return Schedule("interleaved_zb", acts, base.stage_to_rank, m)


def looped_bfs(p: int, m: int, v: int = 2) -> Schedule:
    """Looped BFS (breadth first): loop placement; each local stage runs all micro-batches in turn.

    Rank ``r`` runs F of stage ``r`` for every micro-batch, then stage ``r+p``, …; then the
    backwards from its last stage down, each in reverse micro-batch order. Constraints:
    ``p >= 1``, ``m >= 1``, ``v >= 1``. Peak memory: ``v·m`` stage activations per rank.

        >>> [str(a) for a in looped_bfs(2, 2).actions[0]]
        ['0F0', '0F1', '2F0', '2F1', '2B1', '2B0', '0B1', '0B0']
    """
    check_pm("looped_bfs", p, m)
    check_v("looped_bfs", v)
    acts = [
        [Action(c * p + r, F, i) for c in range(v) for i in range(m)]
        + [Action(c * p + r, B, i) for c in reversed(range(v)) for i in reversed(range(m))]
        for r in range(p)
    ]
    return Schedule("looped_bfs", acts, loop_placement(p, v), m)


def forward_only(
    stage_to_rank: Sequence[int], m: int, deps: Mapping[int, Sequence[int]] | None = None
) -> Schedule:
    """Inference: F of every stage for every micro-batch, for any placement, without deadlock.

    Each rank runs its (stage, mb) pairs sorted by ``(mb + stage, stage)``: a wavefront order.
    Because ``deps`` only point to earlier stages, that key orders every producer before its
    consumers, so all ranks follow one global topological order and the smallest unfinished
    action is always runnable — no deadlock for loop, V or any other placement, skip edges
    included. Constraints: ``m >= 1``, ranks ``0..max(stage_to_rank)`` (a rank may hold none).

        >>> [str(a) for a in forward_only((0, 1, 1, 0), 2).actions[0]]
        ['0F0', '0F1', '3F0', '3F1']
    """
    placement = tuple(int(r) for r in stage_to_rank)
    if not placement or min(placement) < 0:
        raise bad_args(
            "forward_only", f"stage_to_rank={placement}", "at least one stage and ranks >= 0",
            "pass one rank per stage, e.g. (0, 1, 2, 3)",
        )
    check_pm("forward_only", max(placement) + 1, m)
    keys = sorted((i + s, s, i) for s in range(len(placement)) for i in range(m))
    acts: list[list[Action]] = [[] for _ in range(max(placement) + 1)]
    for _, s, i in keys:
        acts[placement[s]].append(Action(s, F, i))
    dep_map = {int(s): tuple(int(d) for d in ds) for s, ds in deps.items()} if deps is not None else {}
    return Schedule("forward_only", acts, placement, m, dep_map)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
    "interleaved_zb": interleaved_zb,
    "looped_bfs": looped_bfs,
    "zb_h1": zb_h1,
    "zb_h2": zb_h2,
    "zbv": zbv,
    "dualpipev": dualpipev,
}
"""Training schedules by name; each is called as ``fn(p, m, **options)``."""


def make_schedule(name: str, p: int, m: int, **options: Any) -> Schedule:
    """Build the schedule registered as ``name`` (see :data:`SCHEDULES`) for ``p`` ranks, ``m`` mbs.

    ``options`` go to the generator (e.g. ``v=4`` for ``interleaved_1f1b`` and ``looped_bfs``,
    ``order="split"`` for ``zbv``). Generators are pure: to let costs pick among variants, use
    :func:`pippy.sim.choose.make_schedule_for`.

        >>> make_schedule("zbv", 2, 4).stage_to_rank
        (0, 1, 1, 0)
        >>> make_schedule("nope", 2, 4)
        Traceback (most recent call last):
        ...
        ValueError: unknown schedule 'nope'; valid names: gpipe, 1f1b, interleaved_1f1b, interleaved_zb, looped_bfs, zb_h1, zb_h2, zbv, dualpipev
    """
    key = name.strip().lower().replace("-", "_")
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(SCHEDULES)}")
    if "costs" in options:
        raise ValueError(
            f"make_schedule({name!r}, ...) got costs=, but schedule generators take no costs (they are pure); "
            "to pick ZB-V's order by costs call pippy.sim.choose.zbv_for_costs(p, m, costs), or "
            f"pippy.sim.choose.make_schedule_for({key!r}, p, m, costs) for any name"
        )
    try:
        return SCHEDULES[key](p, m, **options)
    except TypeError as e:  # an option the generator does not take
        raise ValueError(f"schedule {key!r} does not take options {sorted(options)}: {e}") from e

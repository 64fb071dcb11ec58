"""Vectorised simulation engine (numpy) for schedules with many ranks; same rules as simulate.py.

Each round, every rank whose next action has all its inputs finished runs that action; the rounds
are array operations over the ranks, so the cost is about (rounds x numpy call) plus a linear pass
to read the actions. Used by ``simulate`` for large schedules. This module also holds what the two
engines share: the per-(kind, stage) :class:`Template` that ``simulate`` builds from
:func:`pippy.schedules.ir.needs`, and the exceptions the numpy engine reports problems with
(``simulate`` turns them into its public errors). numpy itself is imported on the first run, so
``simulate`` works without it.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter
from typing import Any, NamedTuple

from pippy.schedules.ir import Done, Kind, Schedule

# Misfit, NeedsLowered, Stuck and run_numpy are simulate()'s own: it runs the engine and reports those as its
# public errors (ValueError, DeadlockError). Template is what both engines read.
__all__ = ["Template"]

_KINDS = list(Kind)
# Enum members carry their definition index as ``_sort_order_`` (CPython >= 3.11): a small int,
# far cheaper to read in bulk than hashing the member. Fall back to ids where it is missing.
_SORT_ORDER_OK = all(getattr(k, "_sort_order_", None) == i for i, k in enumerate(_KINDS))
_NSLOT = len(Done)


class Template(NamedTuple):
    """How every action of one (kind, stage) simulates, micro-batch aside.

    Completion keys are ``(stage * len(Done) + slot) * n_microbatches + mb``; ``own`` and the
    first item of each ``deps`` pair are such keys for micro-batch 0 (add ``mb``).

        >>> Template(0, 1.0, 0, (), 1.0).duration
        1.0
    """

    rank: int
    """The rank the stage lives on."""
    duration: float
    """Seconds of work; ``-1`` marks a RECV, which blocks from "rank free" until its message arrives."""
    own: int
    """Key base of the completion slot the action fills, ``-1`` for a RECV (which fills none)."""
    deps: tuple[tuple[int, float], ...]
    """Per need, ``(key base, delay)``: it must have finished ``delay`` seconds ago (the transfer)."""
    mem_delta: float
    """Bytes the rank holds more (or, negative, fewer) once the action ends."""
    overhead: float = 0.0
    """Runtime seconds after the work (``CostModel.overhead``): the rank is occupied, outputs leave after it."""


class Misfit(Exception):
    """Rank ``rank``'s action at ``pos`` does not fit the schedule (or, ``duplicate``, ran twice)."""

    def __init__(self, rank: int, pos: int, duplicate: bool) -> None:
        super().__init__(rank, pos, duplicate)
        self.rank, self.pos, self.duplicate = rank, pos, duplicate


class Stuck(Exception):
    """Deadlock: ``ptr[r]`` is rank ``r``'s next action; ``waiting[r]`` the key it waits for."""

    def __init__(self, ptr: list[int], waiting: dict[int, int]) -> None:
        super().__init__(ptr, waiting)
        self.ptr, self.waiting = ptr, waiting


class NeedsLowered(Exception):
    """The schedule holds SEND/RECV, but the templates were built for a compute-only one."""


def run_numpy(schedule: Schedule, table: dict[str, list[Template]], static: list[float]) -> dict[str, Any]:
    """Simulate with numpy; ``table[kind.value][stage]`` as built by ``simulate._templates``.

    Returns ``starts``/``ends`` (per-rank float arrays), ``busy``, ``peak``, ``free`` lists, or
    raises :class:`Misfit`, :class:`Stuck` or :class:`NeedsLowered`.
    """
    import numpy as np

    slots = _NSLOT
    R, S, M = schedule.num_ranks, schedule.num_stages, schedule.n_microbatches
    lens = np.fromiter(map(len, schedule.actions), dtype=np.int64, count=R)
    off = np.zeros(R + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    N = int(off[-1])
    acts = schedule.actions
    mb = np.fromiter(map(attrgetter("mb"), chain.from_iterable(acts)), dtype=np.int64, count=N)
    st = np.fromiter(map(attrgetter("stage"), chain.from_iterable(acts)), dtype=np.int64, count=N)
    if _SORT_ORDER_OK:
        kc = np.fromiter(map(attrgetter("kind._sort_order_"), chain.from_iterable(acts)), dtype=np.int64, count=N)
    else:  # pragma: no cover - older Pythons
        kid = np.fromiter(map(id, map(attrgetter("kind"), chain.from_iterable(acts))), dtype=np.int64, count=N)
        kc = np.zeros(N, dtype=np.int64)
        for i, k in enumerate(_KINDS):
            kc[kid == id(k)] = i
        del kid
    rank_of = np.repeat(np.arange(R, dtype=np.int64), lens)
    bad = (st < 0) | (st >= S) | (mb < 0) | (mb >= M)
    if not bad.any():
        bad = np.asarray(schedule.stage_to_rank, dtype=np.int64)[st] != rank_of
    if bad.any():
        n = int(np.argmax(bad))
        raise Misfit(int(rank_of[n]), n - int(off[rank_of[n]]), duplicate=False)
    kinds_here = [k.value for k in _KINDS]
    present = [k for k in kinds_here if k in table]
    if any(_KINDS[i].value not in table for i in np.nonzero(np.bincount(kc, minlength=len(_KINDS)))[0].tolist()):
        raise NeedsLowered()
    # template arrays indexed by kind * S + stage
    T = len(_KINDS) * S
    D = max((len(row.deps) for k in present for row in table[k]), default=0) or 1
    t_rank = np.full(T, -1, dtype=np.int64)
    t_dur = np.zeros(T)
    t_own = np.full(T, -1, dtype=np.int64)
    t_dm = np.zeros(T)
    t_ov = np.zeros(T)
    t_db = np.full((T, D), -1, dtype=np.int64)
    t_dd = np.zeros((T, D))
    for kname in present:
        i = kinds_here.index(kname)
        for s, tp in enumerate(table[kname]):
            t = i * S + s
            t_rank[t], t_dur[t], t_own[t], t_dm[t], t_ov[t] = tp.rank, tp.duration, tp.own, tp.mem_delta, tp.overhead
            for j, (b, d) in enumerate(tp.deps):
                t_db[t, j], t_dd[t, j] = b, d
    tid = kc * S + st
    del kc, st
    nodes = np.arange(N, dtype=np.int64)
    own = t_own[tid]
    dur = t_dur[tid]
    is_recv = dur < 0
    dur = np.where(is_recv, 0.0, dur)
    ov = t_ov[tid] if t_ov.any() else None  # outputs leave (and the rank is free) after the runtime's overhead
    DUMMY, MISSING = N, N + 1
    node_of_key = np.full(S * slots * M, MISSING, dtype=np.int64)
    has = own >= 0
    keys = own[has] + mb[has]
    hn = nodes[has]
    comp = (own[has] % (slots * M)) < int(Done.SEND_F) * M  # F, G, W slots: a compute action
    node_of_key[keys[~comp][::-1]] = hn[~comp][::-1]  # first SEND wins
    node_of_key[keys[comp][::-1]] = hn[comp][::-1]  # first compute action wins: a repeat is the misfit
    dup = node_of_key[keys[comp]] != hn[comp]
    if dup.any():
        n = int(hn[comp][np.argmax(dup)])
        raise Misfit(int(rank_of[n]), n - int(off[rank_of[n]]), duplicate=True)
    del keys, hn, comp, has
    # one 1-D array per dependency column (row gathers plus axis reductions are ~3x slower)
    dep_cols: list[tuple[np.ndarray, np.ndarray | None]] = []
    for j in range(D):
        db = t_db[:, j][tid]
        dn = np.where(db >= 0, node_of_key[np.maximum(db, 0) + mb], DUMMY)
        dd = t_dd[:, j][tid] if t_dd[:, j].any() else None
        dep_cols.append((dn, dd))
    del db, node_of_key
    # done[n]: end time of node n, NaN until it has run; NaN propagates through max, so a round
    # finds the runnable ranks with a single "r0 == r0" test.
    done = np.full(N + 2, np.nan)
    done[DUMMY] = 0.0
    start = np.zeros(N)
    finish = np.zeros(N) if ov is not None else None
    ptr = off[:-1].copy()
    stop = off[1:]
    free = np.zeros(R)
    active = np.nonzero(lens > 0)[0]
    lowered = bool(is_recv.any())
    rounds, recheck = 0, int(lens[active].min()) if active.size else 0
    while active.size:
        cur = ptr[active]
        r0 = done[dep_cols[0][0][cur]]
        for j, (dn, dd) in enumerate(dep_cols):
            x = r0 if j == 0 else done[dn[cur]]
            if dd is not None:
                x += dd[cur]
            if j:
                np.maximum(r0, x, out=r0)
        ok = ~np.isnan(r0)
        if not ok.all():
            if not ok.any():
                waiting: dict[int, int] = {}
                for r, p in zip(active.tolist(), cur.tolist()):
                    j = int(np.argmax([np.isnan(done[dn[p]]) for dn, _ in dep_cols]))
                    waiting[r] = int(t_db[tid[p], j] + mb[p])
                raise Stuck((ptr - off[:-1]).tolist(), waiting)
            cur, ar, r0 = cur[ok], active[ok], r0[ok]
        else:
            ar = active
        f = free[ar]
        s0 = np.maximum(r0, f)
        e0 = s0 + dur[cur]
        if ov is not None and finish is not None:
            finish[cur] = e0
            e0 = e0 + ov[cur]
        if lowered:
            s0 = np.where(is_recv[cur], f, s0)
        start[cur] = s0
        done[cur] = e0
        free[ar] = e0
        ptr[ar] = cur + 1
        rounds += 1
        if rounds >= recheck:  # a rank can only finish after as many rounds as it has actions left
            active = active[ptr[active] < stop[active]]
            recheck = rounds + (int((stop[active] - ptr[active]).min()) if active.size else 0)
    end = done[:N] if finish is None else finish
    busy = np.bincount(rank_of, weights=dur, minlength=R)
    delta = t_dm[tid]
    peak = []
    for r in range(R):
        seg = delta[off[r] : off[r + 1]]
        top = float(np.cumsum(seg).max()) if seg.size else 0.0
        peak.append(static[r] + max(0.0, top))
    return {
        "starts": [start[off[r] : off[r + 1]] for r in range(R)],
        "ends": [end[off[r] : off[r + 1]] for r in range(R)],
        "busy": busy.tolist(),
        "peak": peak,
        "free": free.tolist(),
    }

"""Schedule validator: action counts, placement, dependency order and a deadlock-free run.

Works on compute-only schedules (F/B/I/W) and on lowered ones (with SEND/RECV), and honours
``schedule.deps`` (skip edges). Every error is a :class:`ScheduleError` whose message shows the
rank × step grid with the offending cell(s) in ``[ ]``, says what was expected and how to fix it.

    >>> from pippy.schedules.generators import one_f_one_b
    >>> validate(one_f_one_b(4, 8))
    >>> deadlock_free(one_f_one_b(4, 8))
    True
"""

from __future__ import annotations

from collections.abc import Iterable

from pippy.schedules.ir import Action, Done, Kind, Need, Schedule, comm_around, need_table, stage_comm
from pippy.schedules.render_grid import Cell, grid

__all__ = ["ScheduleError", "deadlock_free", "unit_time_starts", "validate"]

_WINDOW = 10  # grid columns shown either side of a marked cell in error messages


class ScheduleError(ValueError):
    """A schedule breaks a rule; ``cells`` holds the marked ``(rank, step)`` positions."""

    def __init__(self, message: str, cells: Iterable[Cell] = ()) -> None:
        super().__init__(message)
        self.cells: tuple[Cell, ...] = tuple(cells)


def _fail(schedule: Schedule, problem: str, expected: str, fix: str, cells: Iterable[Cell] = ()) -> ScheduleError:
    cells = tuple(cells)
    picture = grid(schedule, mark=cells, window=_WINDOW)
    return ScheduleError(
        f"invalid schedule {schedule.name!r}: {problem}\nexpected: {expected}\nfix: {fix}\n{picture}", cells
    )


def _check_shape(sch: Schedule) -> None:
    n, p = sch.num_stages, sch.num_ranks
    if sch.n_microbatches < 1:
        raise _fail(sch, f"n_microbatches={sch.n_microbatches}", "n_microbatches >= 1", "set n_microbatches")
    for s, r in enumerate(sch.stage_to_rank):
        if not 0 <= r < p:
            raise _fail(
                sch, f"stage_to_rank[{s}]={r} but there are {p} ranks", f"a rank in 0..{p - 1}",
                "fix stage_to_rank or add the missing rank's action list",
            )
    for s, srcs in sch.deps.items():
        bad = [d for d in srcs if not 0 <= d < s]
        if not 0 <= s < n or bad:
            raise _fail(
                sch, f"deps[{s}]={srcs} is not allowed with {n} stages",
                "stages numbered in dataflow order: deps[s] only names stages 0..s-1",
                "renumber the stages so every producer comes before its consumers",
            )


def _positions(sch: Schedule) -> dict[Action, Cell]:
    """Map each action to where it runs, checking range, placement and duplicates."""
    pos: dict[Action, Cell] = {}
    n, m = sch.num_stages, sch.n_microbatches
    for r, acts in enumerate(sch.actions):
        for t, a in enumerate(acts):
            if not 0 <= a.stage < n or not 0 <= a.mb < m:
                raise _fail(
                    sch, f"rank {r} step {t}: {a} is out of range", f"stage in 0..{n - 1} and micro-batch in 0..{m - 1}",
                    "remove the action or fix stage_to_rank / n_microbatches", [(r, t)],
                )
            home = sch.stage_to_rank[a.stage]
            if home != r:
                raise _fail(
                    sch, f"rank {r} step {t}: {a} runs on rank {r}, but stage {a.stage} lives on rank {home}",
                    f"every action of stage {a.stage} on rank {home}",
                    f"move {a} to rank {home}'s list or change stage_to_rank[{a.stage}]", [(r, t)],
                )
            if a in pos:
                r0, t0 = pos[a]
                raise _fail(
                    sch, f"{a} appears twice (rank {r0} step {t0} and rank {r} step {t})",
                    f"exactly one {a}", "delete one of the two", [(r0, t0), (r, t)],
                )
            pos[a] = (r, t)
    return pos


def _check_counts(sch: Schedule, pos: dict[Action, Cell]) -> dict[tuple[int, int], Kind]:
    """Each (stage, mb): one F and either one B or one I plus one W. Returns the backward kind used.

    A schedule with no B/I/W at all is forward-only (inference): then only the F's are required.
    """
    bwd: dict[tuple[int, int], Kind] = {}
    training = any(a.kind in (Kind.B, Kind.I, Kind.W) for a in pos)
    for s in range(sch.num_stages):
        home = sch.stage_to_rank[s]
        for i in range(sch.n_microbatches):
            have = {k: Action(s, k, i) in pos for k in (Kind.F, Kind.B, Kind.I, Kind.W)}
            around = [pos[Action(s, k, i)] for k in (Kind.F, Kind.B, Kind.I, Kind.W) if have[k]]
            if not have[Kind.F]:
                raise _fail(
                    sch, f"{Action(s, Kind.F, i)} is missing (rank {home} never runs it)",
                    f"exactly one F for stage {s} micro-batch {i}", f"add {Action(s, Kind.F, i)} to rank {home}",
                    around,
                )
            if have[Kind.B] and (have[Kind.I] or have[Kind.W]):
                raise _fail(
                    sch, f"stage {s} micro-batch {i} has both a full backward B and a split one (I/W)",
                    "either one B or one I and one W, not both", f"drop {Action(s, Kind.B, i)} or drop the I/W pair",
                    around,
                )
            if not training:
                continue
            if have[Kind.B]:
                bwd[(s, i)] = Kind.B
            elif have[Kind.I] and have[Kind.W]:
                bwd[(s, i)] = Kind.I
            else:
                gone = [str(Action(s, k, i)) for k in (Kind.I, Kind.W) if not have[k]]
                what = " and ".join(gone) if have[Kind.I] or have[Kind.W] else f"{Action(s, Kind.B, i)}"
                raise _fail(
                    sch, f"{what} missing: {Action(s, Kind.F, i)} has no complete backward",
                    f"one B, or one I and one W, for stage {s} micro-batch {i} on rank {home}",
                    f"add {what} to rank {home} after {Action(s, Kind.F, i)}", around,
                )
    return bwd


_COMM_ORDER = (Kind.RECV_F, Kind.SEND_F, Kind.RECV_B, Kind.SEND_B)
_KIND_OF = {Done.F: Kind.F, Done.W: Kind.W, Done.SEND_F: Kind.SEND_F, Done.SEND_B: Kind.SEND_B}


def _peers(table: dict[Kind, tuple[tuple[Need, ...], ...]]) -> dict[tuple[int, Kind], list[int]]:
    """Per (stage, comm kind), the stages on other ranks it talks to (read off the RECVs' needs)."""
    peers: dict[tuple[int, Kind], list[int]] = {}
    for recv, send in ((Kind.RECV_F, Kind.SEND_F), (Kind.RECV_B, Kind.SEND_B)):
        for s, ns in enumerate(table[recv]):
            for n in ns:
                peers.setdefault((s, recv), []).append(n.stage)
                peers.setdefault((n.stage, send), []).append(s)
    return peers


def _check_comm(sch: Schedule, pos: dict[Action, Cell], bwd: dict[tuple[int, int], Kind]) -> None:
    """On a lowered schedule: every needed SEND/RECV is there exactly once, and nothing else."""
    comm = stage_comm(sch)  # forward-only schedules carry no gradients
    for a, cell in pos.items():
        if a.kind.is_comm and a.kind not in comm[a.stage]:
            side = "consumer" if a.kind in (Kind.SEND_F, Kind.RECV_B) else "producer"
            raise _fail(
                sch, f"{a} is not needed: stage {a.stage} has no {side} on another rank",
                "SEND/RECV only between stages on different ranks (see schedule.deps)", f"remove {a}", [cell],
            )
    around = comm_around(sch)
    peers = _peers(need_table(sch, lowered=True))
    for s in range(sch.num_stages):
        kinds = [k for k in _COMM_ORDER if k in comm[s]]
        with_f = set(around[(s, Kind.F)][0] + around[(s, Kind.F)][1])
        for i in range(sch.n_microbatches):
            for kind in kinds:
                if Action(s, kind, i) in pos:
                    continue
                anchor = Action(s, Kind.F, i) if kind in with_f else Action(s, bwd[(s, i)], i)
                where = "before" if kind in around[(s, anchor.kind)][0] else "after"
                raise _fail(
                    sch, f"{Action(s, kind, i)} is missing (stage {s} talks to stages {peers[(s, kind)]} on other ranks)",
                    f"{Action(s, kind, i)} {where} {anchor} on rank {sch.stage_to_rank[s]}",
                    "insert it, or build the communication with pippy.schedules.lower.lower()", [pos[anchor]],
                )


def _split(ns: tuple[Need, ...], a: Action, bwd: dict[tuple[int, int], Kind]) -> tuple[list[Action], list[Action]]:
    """Prerequisites of ``a`` per its needs: (same-rank ones that must come earlier, cross-rank ones to wait for).

    A remote need with a ``via`` (lowered schedules) is served by that RECV, which must come
    earlier on this rank; the RECV itself does the cross-rank wait.
    """
    i = a.mb
    local: list[Action] = []
    remote: list[Action] = []
    vias: list[Action] = []
    for n in ns:
        if n.via is not None:
            via = Action(a.stage, n.via, i)
            if via not in vias:
                vias.append(via)
            continue
        x = Action(n.stage, bwd[(n.stage, i)] if n.done is Done.G else _KIND_OF[n.done], i)
        (remote if n.remote else local).append(x)
    return local + vias, remote


def _prepare(sch: Schedule) -> tuple[dict[Action, Cell], dict[Action, list[Action]]]:
    """Run every static check; return positions and each action's cross-rank waits."""
    _check_shape(sch)
    pos = _positions(sch)
    bwd = _check_counts(sch, pos)
    lowered = any(a.kind.is_comm for a in pos)
    if lowered:
        _check_comm(sch, pos, bwd)
    waits: dict[Action, list[Action]] = {}
    table = need_table(sch, lowered=lowered)
    for a, (r, t) in pos.items():
        local, remote = _split(table[a.kind][a.stage], a, bwd)
        for x in local:
            rx, tx = pos[x]
            if tx > t:
                raise _fail(
                    sch, f"rank {r} step {t}: {a} needs {x} first, but rank {r} runs {x} later, at step {tx}",
                    f"{x} before {a} on rank {r}", f"move {x} before step {t} (or {a} after step {tx})",
                    [(r, t), (rx, tx)],
                )
        waits[a] = remote
    return pos, waits


def _run(sch: Schedule, waits: dict[Action, list[Action]]) -> tuple[dict[Action, int], list[int]]:
    """Unit-time event simulation: every rank runs its list in order, a step per time unit.

    Returns each action's start time and, per rank, how far it got (all of it unless deadlocked).
    """
    head = [0] * sch.num_ranks
    start: dict[Action, int] = {}
    t = 0
    while True:
        movers = []
        for r, acts in enumerate(sch.actions):
            if head[r] < len(acts) and all(x in start for x in waits[acts[head[r]]]):
                movers.append(r)
        if not movers:
            return start, head
        for r in movers:  # decided before applying: an action sees only earlier time units
            start[sch.actions[r][head[r]]] = t
            head[r] += 1
        t += 1


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` is complete, well placed, ordered and runs.

    Checks, in order: shape (placement ranks exist, ``deps`` point to earlier stages); every action
    in range and on the rank holding its stage; no duplicates; per (stage, mb) one F and one B or
    one I + one W (only the F when the schedule has no backward at all: forward-only inference); on lowered schedules exactly the needed SEND/RECV; same-rank prerequisites
    earlier in the list; and a unit-time run in which sends never block and receives (or, on a
    compute-only schedule, cross-rank prerequisites) do — it must finish without deadlock.

        >>> from pippy.schedules.ir import Action, Kind, Schedule
        >>> bad = Schedule("bad", [[Action(0, Kind.B, 0), Action(0, Kind.F, 0)]], (0,), 1)
        >>> validate(bad)
        Traceback (most recent call last):
        ...
        pippy.schedules.validate.ScheduleError: invalid schedule 'bad': rank 0 step 0: 0B0 needs 0F0 first, ...
    """
    pos, waits = _prepare(schedule)
    start, head = _run(schedule, waits)
    if len(start) == len(pos):
        return
    stuck = [(r, head[r]) for r in range(schedule.num_ranks) if head[r] < len(schedule.actions[r])]
    lines = []
    for r, t in stuck:
        a = schedule.actions[r][t]
        missing = [x for x in waits[a] if x not in start]
        why = ", ".join(f"{x} (rank {pos[x][0]} step {pos[x][1]})" for x in missing)
        lines.append(f"  rank {r} step {t}: {a} waits for {why}")
    raise _fail(
        schedule, "deadlock: no rank can move on\n" + "\n".join(lines),
        "every waited-for action reachable before the waiting one (sends never block, receives do)",
        "reorder the ranks' lists so the waited-for actions come earlier (e.g. more warm-up forwards), "
        "or start from a generator in pippy.schedules.generators",
        stuck,
    )


def deadlock_free(schedule: Schedule) -> bool:
    """True when :func:`validate` accepts ``schedule`` (it is complete, ordered and runs to the end).

        >>> from pippy.schedules.generators import gpipe
        >>> deadlock_free(gpipe(3, 2))
        True
    """
    try:
        validate(schedule)
    except ScheduleError:
        return False
    return True


def unit_time_starts(schedule: Schedule) -> list[list[int]]:
    """Start time of every action when each takes one time unit (validates first).

    ``result[r][t]`` is when rank ``r``'s step ``t`` starts. The step time is
    ``max(row[-1] + 1 for row in result if row)``; a rough bubble measure for compute-only schedules.

        >>> from pippy.schedules.generators import one_f_one_b
        >>> unit_time_starts(one_f_one_b(2, 2))
        [[0, 1, 3, 5], [1, 2, 3, 4]]
    """
    pos, waits = _prepare(schedule)
    start, _ = _run(schedule, waits)
    if len(start) < len(pos):
        validate(schedule)  # raises the deadlock error
    return [[start[a] for a in acts] for acts in schedule.actions]


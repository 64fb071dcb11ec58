"""Schedule IR: actions (stage, kind, micro-batch), per-rank action lists and stage placement.

A schedule is plain data. Generators build it, the validator checks it, the lowering adds
communication, the executor runs it and the simulator predicts it. What an action waits for is
written once, in :func:`needs`; all four of those read it from there.

    >>> a = Action.parse("1F0")
    >>> a, str(Action(2, Kind.SEND_B, 3))
    (Action(stage=1, kind=<Kind.F: 'F'>, mb=0), '2SEND_B3')
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from pippy.schedules.summary import schedule_repr

__all__ = [
    "Action",
    "Done",
    "Kind",
    "Need",
    "Schedule",
    "chain_deps",
    "comm_around",
    "loop_placement",
    "need_table",
    "needs",
    "stage_comm",
    "v_placement",
]


class Done(IntEnum):
    """Completion slots: what a finished action of a (stage, micro-batch) makes available.

    ``F`` the forward output, ``G`` the input gradients (from ``B`` or ``I``), ``W`` the weight
    gradients, ``SEND_F`` / ``SEND_B`` a message handed to the link. The simulator keys its
    completion times by ``(stage, slot, micro-batch)``.

        >>> [d.name for d in Done], Kind.I.done, Kind.RECV_F.done
        (['F', 'G', 'W', 'SEND_F', 'SEND_B'], <Done.G: 1>, None)
    """

    F = 0
    G = 1
    W = 2
    SEND_F = 3
    SEND_B = 4


class Kind(str, Enum):
    """What an action does.

    F forward; B full backward; I input-gradient backward; W weight-gradient backward;
    SEND_F / RECV_F move activations; SEND_B / RECV_B move gradients.
    """

    F = "F"
    B = "B"
    I = "I"  # noqa: E741 - the name the literature uses
    W = "W"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def is_comm(self) -> bool:
        """True for SEND_*/RECV_* kinds."""
        return self.value.startswith(("SEND", "RECV"))

    @property
    def is_compute(self) -> bool:
        """True for F, B, I and W."""
        return not self.is_comm

    @property
    def done(self) -> Done | None:
        """The completion slot this kind fills (B and I both fill ``G``); ``None`` for a RECV."""
        return _DONE_OF.get(self)

    def __str__(self) -> str:
        return self.value


_DONE_OF = {
    Kind.F: Done.F, Kind.B: Done.G, Kind.I: Done.G, Kind.W: Done.W,
    Kind.SEND_F: Done.SEND_F, Kind.SEND_B: Done.SEND_B,
}
_SENDER = {Done.SEND_F: Kind.SEND_F, Done.SEND_B: Kind.SEND_B}


_ACTION_RE = re.compile(r"^\s*(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)\s*$")


@dataclass(frozen=True, slots=True)
class Action:
    """One step of one rank: ``kind`` on ``stage`` for micro-batch ``mb``.

    Prints as ``{stage}{kind}{mb}``, e.g. ``1F0``, ``2I3``, ``0W5``, ``1SEND_F2``.

        >>> str(Action(0, Kind.W, 5))
        '0W5'
    """

    stage: int
    kind: Kind
    mb: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.mb}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse the compact form back into an action.

            >>> Action.parse("3RECV_B1")
            Action(stage=3, kind=<Kind.RECV_B: 'RECV_B'>, mb=1)
        """
        m = _ACTION_RE.match(text)
        if m is None:
            raise ValueError(
                f"cannot parse action {text!r}: expected <stage><kind><microbatch> such as '1F0', "
                f"'2I3', '0W5' or '1SEND_F2' (kinds: {', '.join(k.value for k in Kind)})"
            )
        return cls(int(m.group(1)), Kind(m.group(2)), int(m.group(3)))


def loop_placement(num_ranks: int, stages_per_rank: int = 1) -> tuple[int, ...]:
    """Stage ``s`` on rank ``s % num_ranks`` (the looped placement of interleaved schedules).

        >>> loop_placement(2, 2)
        (0, 1, 0, 1)
    """
    if num_ranks < 1 or stages_per_rank < 1:
        raise ValueError(f"need num_ranks >= 1 and stages_per_rank >= 1, got {num_ranks}, {stages_per_rank}")
    return tuple(s % num_ranks for s in range(num_ranks * stages_per_rank))


def v_placement(num_ranks: int) -> tuple[int, ...]:
    """Rank ``r`` holds stages ``r`` and ``2p-1-r`` (the V shape of ZB-V and DualPipeV).

        >>> v_placement(3)
        (0, 1, 2, 2, 1, 0)
    """
    if num_ranks < 1:
        raise ValueError(f"need num_ranks >= 1, got {num_ranks}")
    return tuple(list(range(num_ranks)) + list(reversed(range(num_ranks))))


def chain_deps(num_stages: int) -> dict[int, tuple[int, ...]]:
    """The dependency map of a plain chain: stage s takes its input from stage s-1.

        >>> chain_deps(3)
        {0: (), 1: (0,), 2: (1,)}
    """
    return {s: ((s - 1,) if s > 0 else ()) for s in range(num_stages)}


@dataclass(slots=True)
class Schedule:
    """Per-rank action lists plus where each stage lives.

    ``stage_to_rank[s]`` is the rank holding stage ``s``. ``deps[s]`` lists the stages whose
    outputs stage ``s`` consumes; it defaults to a chain and may hold skip edges (any earlier
    stage). ``actions[r]`` is rank ``r``'s program, run in order.

        >>> from pippy.schedules.ir import Schedule, Action, Kind
        >>> s = Schedule("tiny", [[Action(0, Kind.F, 0)]], (0,), 1)
        >>> s.num_ranks, s.num_stages
        (1, 1)
    """

    name: str
    actions: list[list[Action]]
    stage_to_rank: tuple[int, ...]
    n_microbatches: int
    deps: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stage_to_rank = tuple(self.stage_to_rank)
        if not self.deps:
            self.deps = chain_deps(len(self.stage_to_rank))

    @property
    def num_ranks(self) -> int:
        """Number of ranks (length of ``actions``)."""
        return len(self.actions)

    @property
    def num_stages(self) -> int:
        """Number of stages (length of ``stage_to_rank``)."""
        return len(self.stage_to_rank)

    def stages_of(self, rank: int) -> list[int]:
        """Stages placed on ``rank``, ascending."""
        return [s for s, r in enumerate(self.stage_to_rank) if r == rank]

    def consumers(self) -> dict[int, tuple[int, ...]]:
        """Inverse of ``deps``: for each stage, the stages that consume its outputs."""
        out: dict[int, list[int]] = {s: [] for s in range(self.num_stages)}
        for dst, srcs in self.deps.items():
            for src in srcs:
                out[src].append(dst)
        return {s: tuple(sorted(v)) for s, v in out.items()}

    def with_deps(self, deps: Mapping[int, Iterable[int]]) -> Schedule:
        """A copy whose stage dependencies are ``deps`` (e.g. a Pipe's skip edges)."""
        return Schedule(
            self.name,
            [list(r) for r in self.actions],
            self.stage_to_rank,
            self.n_microbatches,
            {int(s): tuple(sorted(set(v))) for s, v in deps.items()},
        )

    def compute_only(self) -> Schedule:
        """A copy with every SEND/RECV removed."""
        return Schedule(
            self.name,
            [[a for a in r if a.kind.is_compute] for r in self.actions],
            self.stage_to_rank,
            self.n_microbatches,
            dict(self.deps),
        )

    def uses_split_backward(self) -> bool:
        """True when the schedule uses I/W instead of B."""
        return any(a.kind in (Kind.I, Kind.W) for r in self.actions for a in r)

    __repr__ = schedule_repr  # a short summary whatever the size; str() lists every action

    def __str__(self) -> str:
        width = max((len(str(a)) for r in self.actions for a in r), default=2)
        lines = [f"{self.name}: {self.num_ranks} ranks, {self.num_stages} stages, {self.n_microbatches} microbatches"]
        for r, acts in enumerate(self.actions):
            lines.append(f"rank {r}: " + " ".join(str(a).rjust(width) for a in acts))
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Need:
    """One prerequisite of an action: the action of ``stage`` (same micro-batch) filling ``done``.

    ``remote`` says that stage lives on another rank, so what it made must travel first: its
    message arrives ``latency + bytes / bandwidth`` after it finished. ``via`` is set only for
    compute actions of a lowered schedule: the RECV on the waiting stage's rank that brings the
    message in (it must run earlier on that rank; the compute action itself waits for nothing
    remote, the RECV does).

        >>> Need(0, Done.F, remote=True)
        Need(stage=0, done=<Done.F: 0>, remote=True, via=None)
    """

    stage: int
    done: Done
    remote: bool
    via: Kind | None = None


def _rule(
    kind: Kind, s: int, lowered: bool, place: Sequence[int], producers: Sequence[int], consumers: Sequence[int]
) -> tuple[Need, ...]:
    """The dependency rule, written once: what ``kind`` on stage ``s`` needs (see :func:`needs`)."""
    r = place[s]

    def edge(peer: int, slot: Done, sent: Done, recv: Kind) -> Need:
        if place[peer] == r:
            return Need(peer, slot, False)
        return Need(peer, sent, True, recv) if lowered else Need(peer, slot, True)

    if kind is Kind.F:
        return tuple(edge(d, Done.F, Done.SEND_F, Kind.RECV_F) for d in producers)
    if kind is Kind.B or kind is Kind.I:
        return (Need(s, Done.F, False), *(edge(c, Done.G, Done.SEND_B, Kind.RECV_B) for c in consumers))
    if kind is Kind.W or kind is Kind.SEND_B:
        return (Need(s, Done.G, False),)
    if kind is Kind.SEND_F:
        return (Need(s, Done.F, False),)
    if kind is Kind.RECV_F:
        return tuple(Need(d, Done.SEND_F, True) for d in producers if place[d] != r)
    return tuple(Need(c, Done.SEND_B, True) for c in consumers if place[c] != r)  # RECV_B


def needs(schedule: Schedule, stage: int, kind: Kind, *, lowered: bool) -> tuple[Need, ...]:
    """What ``kind`` on ``stage`` waits for (same micro-batch), per ``schedule.deps`` and placement.

    The one dependency rule of the project; the validator, the lowering, the simulator and the
    executor all read it from here. For stage ``s``:

    - ``F``: each producer ``d`` in ``deps[s]`` has finished its ``F``;
    - ``B`` / ``I``: ``s``'s own ``F``, and each consumer ``c`` has its input gradients (``G``);
    - ``W`` and ``SEND_B``: ``s``'s own input gradients (``G``); ``SEND_F``: ``s``'s own ``F``;
    - ``RECV_F``: each producer on another rank has run its ``SEND_F``; ``RECV_B``: each consumer on
      another rank has run its ``SEND_B``.

    A producer or consumer on another rank gives a ``remote`` need. With ``lowered`` (the schedule
    holds SEND/RECV), a compute action's remote need names the peer's SEND slot and, as ``via``,
    the RECV that must run before it on this rank; without, it names the peer's compute slot.

        >>> s = Schedule("t", [[], []], (0, 1), 1)
        >>> needs(s, 1, Kind.F, lowered=False)
        (Need(stage=0, done=<Done.F: 0>, remote=True, via=None),)
        >>> [(n.stage, n.done.name, n.via) for n in needs(s, 0, Kind.B, lowered=True)]
        [(0, 'F', None), (1, 'SEND_B', <Kind.RECV_B: 'RECV_B'>)]
    """
    if not 0 <= stage < schedule.num_stages:
        raise ValueError(
            f"stage {stage} is out of range for schedule {schedule.name!r}: expected 0..{schedule.num_stages - 1}; "
            "pass a stage of this schedule"
        )
    cons = schedule.consumers().get(stage, ())
    return _rule(kind, stage, lowered, schedule.stage_to_rank, schedule.deps.get(stage, ()), cons)


def need_table(schedule: Schedule, *, lowered: bool) -> dict[Kind, tuple[tuple[Need, ...], ...]]:
    """:func:`needs` for every kind and stage at once: ``table[kind][stage]`` (linear in the edges).

        >>> t = need_table(Schedule("t", [[], []], (0, 1), 1), lowered=True)
        >>> t[Kind.RECV_F]
        ((), (Need(stage=0, done=<Done.SEND_F: 3>, remote=True, via=None),))
    """
    place, cons = schedule.stage_to_rank, schedule.consumers()
    return {
        k: tuple(_rule(k, s, lowered, place, schedule.deps.get(s, ()), cons.get(s, ())) for s in range(len(place)))
        for k in Kind
    }


def _trains(schedule: Schedule) -> bool:
    return any(a.kind is Kind.B or a.kind is Kind.I or a.kind is Kind.W for acts in schedule.actions for a in acts)


def stage_comm(schedule: Schedule) -> dict[int, frozenset[Kind]]:
    """Per stage, the SEND/RECV kinds its lowered form holds (one of each per micro-batch).

    Derived from :func:`needs`: a stage runs ``RECV_F`` when a producer lives on another rank and
    ``RECV_B`` when a consumer does; it runs ``SEND_F`` (``SEND_B``) when a ``RECV_F``
    (``RECV_B``) of another stage waits for it, i.e. when a consumer (producer) lives on another
    rank. One ``SEND_F`` carries the outputs to every remote consumer. Gradient kinds appear only
    when the schedule trains (holds B, I or W): a forward-only schedule moves no gradients. Where
    each goes is :func:`comm_around`: RECV right before, SEND right after, ``F`` for the ``*_F``
    kinds, ``B`` or ``I`` for the ``*_B`` kinds.

        >>> from pippy.schedules.ir import Action
        >>> s = Schedule("t", [[Action(0, Kind.F, 0)], [Action(1, Kind.F, 0)]], (0, 1), 1)
        >>> stage_comm(s) == {0: {Kind.SEND_F}, 1: {Kind.RECV_F}}
        True
    """
    return _stage_comm(schedule, need_table(schedule, lowered=True))


def _stage_comm(schedule: Schedule, table: dict[Kind, tuple[tuple[Need, ...], ...]]) -> dict[int, frozenset[Kind]]:
    recvs = (Kind.RECV_F, Kind.RECV_B) if _trains(schedule) else (Kind.RECV_F,)
    out: dict[int, set[Kind]] = {s: set() for s in range(schedule.num_stages)}
    for recv in recvs:
        for s, ns in enumerate(table[recv]):
            for n in ns:
                out[s].add(recv)
                out[n.stage].add(_SENDER[n.done])
    return {s: frozenset(v) for s, v in out.items()}


def comm_around(schedule: Schedule) -> dict[tuple[int, Kind], tuple[tuple[Kind, ...], tuple[Kind, ...]]]:
    """Per (stage, compute kind): the comm kinds that go right before it and right after it.

    A RECV goes before the compute action whose :func:`needs` name it as ``via``; a SEND after
    the compute action that fills the slot it needs (``SEND_F`` after ``F``; ``SEND_B`` after
    ``B`` or ``I``). Only kinds in :func:`stage_comm` appear. :func:`pippy.schedules.lower.lower`
    inserts exactly these.

        >>> from pippy.schedules.ir import Action
        >>> s = Schedule("t", [[Action(0, Kind.F, 0), Action(0, Kind.B, 0)], []], (0, 1), 1)
        >>> comm_around(s)[(0, Kind.B)], comm_around(s)[(1, Kind.F)]
        (((<Kind.RECV_B: 'RECV_B'>,), ()), ((<Kind.RECV_F: 'RECV_F'>,), ()))
    """
    table = need_table(schedule, lowered=True)
    comm = _stage_comm(schedule, table)
    out: dict[tuple[int, Kind], tuple[tuple[Kind, ...], tuple[Kind, ...]]] = {}
    for s in range(schedule.num_stages):
        for k in (Kind.F, Kind.B, Kind.I, Kind.W):
            before = tuple(dict.fromkeys(n.via for n in table[k][s] if n.via is not None and n.via in comm[s]))
            own = Need(s, _DONE_OF[k], False)
            after = tuple(c for c in (Kind.SEND_F, Kind.SEND_B) if c in comm[s] and own in table[c][s])
            out[(s, k)] = (before, after)
    return out


def as_actions(items: Sequence[str | Action]) -> list[Action]:
    """Turn a list of compact strings (or actions) into actions.

        >>> as_actions(["0F0", "0B0"])[1].kind
        <Kind.B: 'B'>
    """
    return [a if isinstance(a, Action) else Action.parse(a) for a in items]

"""Schedule IR: actions (stage, kind, micro-batch), per-rank action lists and stage placement.

A schedule is plain data. Generators build it, the validator checks it, the lowering adds
communication, the executor runs it and the simulator predicts it.

    >>> a = Action.parse("1F0")
    >>> a, str(Action(2, Kind.SEND_B, 3))
    (Action(stage=1, kind=<Kind.F: 'F'>, mb=0), '2SEND_B3')
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "Action",
    "Kind",
    "Schedule",
    "chain_deps",
    "loop_placement",
    "v_placement",
]


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

    def __str__(self) -> str:
        return self.value


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

    def __str__(self) -> str:
        width = max((len(str(a)) for r in self.actions for a in r), default=2)
        lines = [f"{self.name}: {self.num_ranks} ranks, {self.num_stages} stages, {self.n_microbatches} microbatches"]
        for r, acts in enumerate(self.actions):
            lines.append(f"rank {r}: " + " ".join(str(a).rjust(width) for a in acts))
        return "\n".join(lines)


def as_actions(items: Sequence[str | Action]) -> list[Action]:
    """Turn a list of compact strings (or actions) into actions.

        >>> as_actions(["0F0", "0B0"])[1].kind
        <Kind.B: 'B'>
    """
    return [a if isinstance(a, Action) else Action.parse(a) for a in items]

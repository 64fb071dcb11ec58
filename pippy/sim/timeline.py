"""Timeline: timed actions per rank, shared by the simulator and by traces of real runs.

Times are seconds from any origin; every helper measures from the earliest event.

    >>> from pippy.schedules.ir import Action, Kind
    >>> t = Timeline([Event(0, Action(0, Kind.F, 0), 0.0, 1.0), Event(1, Action(1, Kind.F, 0), 1.0, 2.0)], 2)
    >>> t.step_time, t.bubble_fraction(0)
    (2.0, 0.5)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pippy.schedules.ir import Action

__all__ = ["Event", "Timeline"]


@dataclass(frozen=True, slots=True)
class Event:
    """``action`` ran on ``rank`` from ``start`` to ``end`` (seconds).

        >>> from pippy.schedules.ir import Action
        >>> Event(0, Action.parse("0F1"), 2.0, 3.5).duration
        1.5
    """

    rank: int
    action: Action
    start: float
    end: float

    @property
    def duration(self) -> float:
        """``end - start``."""
        return self.end - self.start


@dataclass(slots=True)
class Timeline:
    """All events of one training step, predicted or measured.

    ``bubble_fraction(r)`` is the idle share of rank ``r`` over the step: ``1 - busy / step``,
    where busy counts compute actions (F, B, I, W) only and the step runs from the earliest
    event start to the latest event end over all ranks. ``unit_costs`` marks a prediction made
    with unit costs (F=1, ...): its times are cost units, not seconds.

        >>> Timeline([], 2).step_time
        0.0
    """

    events: list[Event]
    num_ranks: int
    name: str = ""
    unit_costs: bool = False

    @property
    def origin(self) -> float:
        """Start of the earliest event (0 when empty)."""
        return min((e.start for e in self.events), default=0.0)

    @property
    def step_time(self) -> float:
        """Latest end minus earliest start, over every rank."""
        if not self.events:
            return 0.0
        return max(e.end for e in self.events) - self.origin

    def rank_events(self, rank: int) -> list[Event]:
        """Events of ``rank`` sorted by start."""
        return sorted((e for e in self.events if e.rank == rank), key=lambda e: (e.start, e.end))

    def busy_time(self, rank: int) -> float:
        """Time ``rank`` spends in compute actions (overlapping intervals counted once)."""
        return _union_length(sorted((e.start, e.end) for e in self.events if e.rank == rank and e.action.kind.is_compute))

    def bubble_fraction(self, rank: int) -> float:
        """Idle share of ``rank``: ``1 - busy_time(rank) / step_time`` (0 for an empty timeline)."""
        step = self.step_time
        return 0.0 if step <= 0 else 1.0 - self.busy_time(rank) / step

    def bubbles(self) -> list[float]:
        """``bubble_fraction`` of every rank, in one pass over the events."""
        spans: list[list[tuple[float, float]]] = [[] for _ in range(self.num_ranks)]
        for e in self.events:
            if e.action.kind.is_compute and 0 <= e.rank < self.num_ranks:
                spans[e.rank].append((e.start, e.end))
        step = self.step_time
        if step <= 0:
            return [0.0] * self.num_ranks
        return [1.0 - _union_length(sorted(s)) / step for s in spans]

    def normalized(self) -> Timeline:
        """A copy shifted so that the earliest event starts at 0."""
        o = self.origin
        return Timeline([Event(e.rank, e.action, e.start - o, e.end - o) for e in self.events], self.num_ranks, self.name,
                        self.unit_costs)

    # ---- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "num_ranks", "events": [[rank, "1F0", start, end], ...]}``, and ``"unit_costs": true`` if so."""
        out: dict[str, Any] = {
            "name": self.name,
            "num_ranks": self.num_ranks,
            "events": [[e.rank, str(e.action), e.start, e.end] for e in self.events],
        }
        if self.unit_costs:
            out["unit_costs"] = True
            out["time_unit"] = "cost units (unit costs: F=I=W=1, B=2), not seconds"
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timeline:
        """Inverse of ``to_dict``.

            >>> Timeline.from_dict({"num_ranks": 1, "events": [[0, "0F0", 0, 1]]}).events[0].action.kind.value
            'F'
        """
        if not isinstance(data, dict) or "events" not in data:
            raise ValueError("timeline JSON must be an object with 'events' (and 'num_ranks')")
        events = [Event(int(r), Action.parse(str(a)), float(s), float(e)) for r, a, s, e in data["events"]]
        n = int(data.get("num_ranks") or (max((e.rank for e in events), default=-1) + 1))
        return cls(events, n, str(data.get("name", "")), bool(data.get("unit_costs", False)))

    def to_json(self, path: str | Path) -> None:
        """Write the timeline to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> Timeline:
        """Read a timeline written by ``to_json``."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a timeline JSON file: {e}") from e

    @classmethod
    def from_events(cls, events: Iterable[Event], num_ranks: int | None = None, name: str = "") -> Timeline:
        """Build from any iterable of events; ``num_ranks`` defaults to the highest rank + 1."""
        ev = list(events)
        n = num_ranks if num_ranks is not None else max((e.rank for e in ev), default=-1) + 1
        return cls(ev, n, name)


def _union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by sorted ``(start, end)`` intervals."""
    total = 0.0
    cur_s = cur_e = None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_s is not None and cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
    if cur_s is not None and cur_e is not None:
        total += cur_e - cur_s
    return total

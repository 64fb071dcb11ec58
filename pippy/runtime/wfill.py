"""Bubble filling at run time: a rank about to wait for a message runs a later W instead, when it is safe.

A weight-gradient step (W) feeds no other action, so a rank may run it earlier than its
schedule says. The executor does so only while it waits for a message, and only when

* the W's micro-batch already ran its I on this rank;
* no B or W of the same stage lies between the wait and the W in the schedule (only those two
  add into ``.grad``; F and I do not), so each parameter still sums its micro-batch gradients in
  the scheduled order: results are bitwise those of the static schedule, whatever the timing;
* the previous step waited at least that long here (steps repeat, so the last one predicts
  this one), and the message has not arrived yet.

Static schedules place W's from a cost guess; when the real costs differ (a heavier last stage,
a slower link), this recovers the idle time they leave.

    >>> from pippy.schedules.ir import as_actions
    >>> f = BubbleFiller(as_actions(["1RECV_B0", "1I0", "1RECV_B1", "1I1", "1W0", "1W1"]))
    >>> f.note_w(1, 0.01); f.note_wait(2, 0.05, 0.0)   # last step: 50 ms idle at 1RECV_B1
    >>> f.pick(2, {(1, 0)}, 0.0)                        # so run 1W0 (index 4) there
    4
    >>> f.pick(2, {(1, 0)}, 0.045)                      # not when only 5 ms of the wait are left
"""

from __future__ import annotations

from collections.abc import Sequence

from pippy.schedules.ir import Action, Kind

__all__ = ["BubbleFiller"]


class BubbleFiller:
    """Chooses which later W a rank runs while it waits; remembers waits and W times across steps.

        >>> from pippy.schedules.ir import as_actions
        >>> BubbleFiller(as_actions(["0F0", "0RECV_B0", "0B0"])).active
        False
    """

    def __init__(self, actions: Sequence[Action]) -> None:
        self.actions = list(actions)
        self._ws = [j for j, a in enumerate(self.actions) if a.kind is Kind.W]
        self.active = bool(self._ws)
        self.ran: set[int] = set()  # action indices already run early this step
        self.fixed: set[int] = set()  # stages whose W's stay in their slot (data-parallel collectives keep rank order)
        self._slack: dict[int, float] = {}  # wait index -> seconds it waited (plus W's run there) last step
        self._w_cost: dict[int, float] = {}  # stage -> seconds of its last W

    def start_step(self) -> None:
        """Forget which W's ran early (keep the timings)."""
        self.ran = set()

    def note_w(self, stage: int, seconds: float) -> None:
        """Record how long a W of ``stage`` took."""
        self._w_cost[stage] = seconds

    def note_wait(self, idx: int, waited: float, filled: float, arrival: float | None = None) -> None:
        """Record the wait at action ``idx``: ``waited`` blocked, after ``filled`` seconds of early W's.

        ``arrival``: when known, seconds after reaching the wait at which the message came in
        during the early W's; it replaces ``waited + filled``, which then overstates the slack.
        """
        self._slack[idx] = arrival if arrival is not None else waited + filled

    def pick(self, idx: int, i_done: set[tuple[int, int]], filled: float) -> int | None:
        """Index of a W to run now at wait ``idx`` (``filled`` seconds already spent there), or None."""
        budget = self._slack.get(idx, 0.0) - filled
        if budget <= 0.0:
            return None
        for j in self._ws:
            if j <= idx or j in self.ran:
                continue
            a = self.actions[j]
            if a.stage in self.fixed:
                continue
            cost = self._w_cost.get(a.stage)
            if cost is None or cost > budget or (a.stage, a.mb) not in i_done:
                continue
            if any(
                k not in self.ran and b.stage == a.stage and b.kind in (Kind.B, Kind.W)
                for k, b in enumerate(self.actions[idx + 1 : j], start=idx + 1)
            ):
                continue
            return j
        return None

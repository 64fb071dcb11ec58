"""Schedule attributes under PyTorch pipelining's names (``_stages``, ``_n_microbatches``, ``pipeline_order``, ...).

Frameworks written for that package read these off a schedule; here they show pippy's own
state. ``_loss_fn`` (assignable) lives with ``loss_fn`` on the schedule base.

    >>> import torch
    >>> from pippy import Schedule1F1B, pipeline
    >>> from pippy.runtime.localcomm import LocalTransport
    >>> pipe = pipeline(torch.nn.Linear(2, 2), 2, (torch.ones(4, 2),))
    >>> sched = Schedule1F1B(pipe.build_stage(0, "cpu"), 2, loss_fn=torch.nn.functional.mse_loss,
    ...                      transport=LocalTransport.world(1)[0])
    >>> sched._n_microbatches, sched._has_backward, [str(a) for a in sched.pipeline_order[0]]
    (2, True, ['0F0', '0B0', '0F1', '0B1'])
    >>> sched.pipeline_order = {0: ["0F0", None, "0F1", "0B0", "0B1"]}  # a custom order, as _load_actions
    >>> [str(a) for a in sched.pipeline_order[0]]
    ['0F0', '0F1', '0B0', '0B1']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pippy.schedules.ir import Schedule

__all__ = ["OVERLAP_F_B", "PeerAttributes"]

OVERLAP_F_B = "OVERLAP_F_B"  # PyTorch pipelining's action kind for one F overlapped with another micro-batch's B


class PeerAttributes:
    """Mixin for schedule classes: PyTorch pipelining's attribute names over pippy's state."""

    stages: list[Any]
    n_microbatches: int
    _load_actions: Callable[..., None]  # OrderIO's: check the order and run it from the next step
    trains: bool
    schedule: Schedule | None
    _eval_schedule: Schedule | None

    @property
    def _stages(self) -> list[Any]:
        return self.stages

    @property
    def _n_microbatches(self) -> int:
        return self.n_microbatches

    @property
    def _has_backward(self) -> bool:
        return self.trains

    @property
    def pipeline_order(self) -> dict[int, list[Any]]:
        """``{rank: [action, ...]}``: every rank's compute actions in the order this schedule runs them.

        Assigning ``{rank: [action or None, ...]}`` (after ``super().__init__``, as PyTorch pipelining's
        custom schedules do) runs that order from the next step: the same as ``_load_actions``. As there,
        an empty mapping may be assigned and filled rank by rank (``self.pipeline_order[r] = [...]``,
        also on the mapping read here): the filled order runs once ``_validate_and_set_stage_mapping``
        is called with it, or at the next step.
        """
        mine = self.__dict__.get("_peer_order")
        if isinstance(mine, _Order) and mine.changed:
            return mine  # being filled: item assignments land here
        mine = _Order(self._running_order())
        self.__dict__["_peer_order"] = mine
        return mine

    @pipeline_order.setter
    def pipeline_order(self, actions: Mapping[int, Sequence[Any]]) -> None:
        if not actions:  # PyTorch pipelining's custom schedules start from {} and fill it rank by rank
            self.__dict__["_peer_order"] = _Order(changed=True)
            return
        self._load_actions(actions)
        self.__dict__.pop("_peer_order", None)

    def _running_order(self) -> dict[int, list[Any]]:
        sch = self.schedule if self.schedule is not None else self._eval_schedule
        return {} if sch is None else {r: list(row) for r, row in enumerate(sch.compute_only().actions)}

    def _load_changed_order(self) -> None:
        """Run an order filled in through ``pipeline_order[r] = ...`` and not loaded yet (at the next step)."""
        mine = self.__dict__.get("_peer_order")
        if isinstance(mine, _Order) and mine.changed:
            self._validate_and_set_stage_mapping(mine)

    @property
    def pipeline_order_with_comms(self) -> dict[int, list[Any]]:
        """``{rank: [action, ...]}`` with the SEND/RECV actions pippy added; assigning one loads its compute order
        (pippy orders the messages itself)."""
        return {} if self.schedule is None else {r: list(row) for r, row in enumerate(self.schedule.actions)}

    @pipeline_order_with_comms.setter
    def pipeline_order_with_comms(self, actions: Mapping[int, Sequence[Any]]) -> None:
        self._load_actions(actions, format="compute_comms")

    def _validate_and_set_stage_mapping(self, actions: Mapping[int, Sequence[Any]]) -> None:
        """Check ``actions`` (``{rank: [action or None, ...]}``) and run them, unless they are the order this schedule
        already runs (PyTorch pipelining's custom schedules call it after assigning ``pipeline_order``)."""
        given = {r: [str(a) for a in row if a is not None] for r, row in actions.items()}
        running = {r: [str(a) for a in row] for r, row in self._running_order().items()}
        if {r: row for r, row in given.items() if row} != {r: row for r, row in running.items() if row}:
            self._load_actions(actions)
        self.__dict__.pop("_peer_order", None)

    def register_custom_function(self, computation_type: Any, custom_function: Any) -> None:
        """Refused: pippy runs every action itself (PyTorch pipelining lets a framework run OVERLAP_F_B cells)."""
        raise NotImplementedError(
            f"{type(self).__name__}.register_custom_function({computation_type!r}, ...): pippy runs each F, I, W and B "
            "itself and has no hook to replace one (such as an overlapped F/B with expert-parallel communication). "
            "Leave it out: the schedule runs the same actions one after another, with the same results"
        )


class _Order(dict):  # type: ignore[type-arg]
    """``pipeline_order``'s mapping: writing a rank's row marks it changed (to be loaded, see ``pipeline_order``).

        >>> order = _Order({0: ["0F0"]})
        >>> order.changed, (order.__setitem__(1, ["1F0"]), order.changed)[1]
        (False, True)
    """

    def __init__(self, *args: Any, changed: bool = False) -> None:
        super().__init__(*args)
        self.changed = changed

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.changed = True

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self.changed = True

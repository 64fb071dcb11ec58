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
        custom schedules do) runs that order from the next step: the same as ``_load_actions``.
        """
        sch = self.schedule if self.schedule is not None else self._eval_schedule
        return {} if sch is None else {r: list(row) for r, row in enumerate(sch.compute_only().actions)}

    @pipeline_order.setter
    def pipeline_order(self, actions: Mapping[int, Sequence[Any]]) -> None:
        self._load_actions(actions)

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
        running = {r: [str(a) for a in row] for r, row in self.pipeline_order.items()}
        if {r: row for r, row in given.items() if row} != {r: row for r, row in running.items() if row}:
            self._load_actions(actions)

    def register_custom_function(self, computation_type: Any, custom_function: Any) -> None:
        """Refused: pippy runs every action itself (PyTorch pipelining lets a framework run OVERLAP_F_B cells)."""
        raise NotImplementedError(
            f"{type(self).__name__}.register_custom_function({computation_type!r}, ...): pippy runs each F, I, W and B "
            "itself and has no hook to replace one (such as an overlapped F/B with expert-parallel communication). "
            "Leave it out: the schedule runs the same actions one after another, with the same results"
        )

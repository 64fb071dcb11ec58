"""Loading and dumping a schedule's order after it is built: ``_load_csv``, ``_load_actions``, ``_dump_csv``.

These are the entry points PyTorch's pipelining package offers on its schedules (torchtitan
loads a CSV into ``PipelineScheduleMulti`` or ``_PipelineScheduleRuntime`` this way). Any CSV
:func:`pippy.schedules.lower.from_csv` reads loads: pippy's own (with or without SEND/RECV)
or the package's (its overlap and FSDP cells are understood). The order is validated, and every
rank must load the same one before its next step::

    sched = PipelineScheduleMulti(stages, 8, loss_fn=F.cross_entropy)
    sched._load_csv("order.csv")
    sched.step(x, target=y)

    >>> import torch
    >>> from pippy import PipelineScheduleSingle, pipeline
    >>> from pippy.runtime.localcomm import LocalTransport
    >>> pipe = pipeline(torch.nn.Linear(2, 2), 2, (torch.ones(4, 2),))
    >>> sched = PipelineScheduleSingle(pipe.build_stage(0, "cpu"), 2, transport=LocalTransport.world(1)[0])
    >>> sched._load_actions({0: ["0F0", "0F1", "0B0", "0B1"]})
    >>> print(sched._dump_actions()[0])
    ['0F0', '0F1', '0B0', '0B1']
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pippy.schedules.ir import Schedule
from pippy.schedules.lower import cell_actions, from_csv, from_csv_string, to_csv

__all__ = ["OrderIO"]

_FORMATS = ("compute_only", "compute_comms")


class OrderIO:
    """Mixin for schedule classes: replace the order a schedule runs, or write it out."""

    n_microbatches: int
    schedule: Schedule | None
    stages: list[Any]
    _install: Callable[[Schedule, bool], None]  # PipelineSchedule's: fuse, check, lower, run from the next step

    def _load_csv(self, filename: str | os.PathLike[str], format: str = "compute_only") -> None:
        """Run the order in CSV ``filename`` from the next step on (one row per rank; see the module doc)."""
        _check_format(type(self).__name__, format)
        self._load(from_csv(filename), f"CSV {os.fspath(filename)!r}")

    def _load_actions(self, actions: Mapping[int, Sequence[Any]], format: str = "compute_only") -> None:
        """Run ``{rank: [action, ...]}`` from the next step on; actions are pippy's or PyTorch pipelining's
        (anything whose ``str`` reads like ``1F0``), or strings; ``None`` entries are skipped."""
        _check_format(type(self).__name__, format)
        if not isinstance(actions, Mapping) or not all(isinstance(r, int) for r in actions):
            raise TypeError(f"{type(self).__name__}._load_actions: expected {{rank: [actions]}}, got "
                            f"{type(actions).__name__}")
        ranks = max(actions, default=-1) + 1
        rows = [[str(a) for a in actions.get(r, ()) if a is not None] for r in range(ranks)]
        if not any(rows):
            raise ValueError(
                f"{type(self).__name__}._load_actions: expected an action list for every rank, got no action at all "
                f"({dict(actions)!r}). Fill it first: order[rank] = [actions], for each rank, then load it (assign "
                "pipeline_order, or call _validate_and_set_stage_mapping(order))"
            )
        for r, row in enumerate(rows):
            for cell in row:
                try:
                    cell_actions(cell)
                except ValueError as exc:
                    raise ValueError(f"{type(self).__name__}._load_actions: rank {r}: {exc}") from None
        text = f"# ranks: {ranks}\n" + "".join(",".join(row) + "\n" for row in rows)
        self._load(from_csv_string(text), "the given actions")

    def _load(self, sch: Schedule, what: str) -> None:
        if sch.n_microbatches != self.n_microbatches:
            raise ValueError(
                f"{type(self).__name__}: {what} has {sch.n_microbatches} micro-batches but this schedule was built "
                f"with n_microbatches={self.n_microbatches}; build it with n_microbatches={sch.n_microbatches}"
            )
        self._install(sch.compute_only(), False)

    def _dump_actions(self, format: str = "compute_only") -> dict[int, list[str]]:
        """``{rank: [action, ...]}`` of the order this schedule runs, as strings (``compute_comms``: with SEND/RECV)."""
        _check_format(type(self).__name__, format)
        if self.schedule is None:
            raise ValueError(f"{type(self).__name__} has no training order to dump; load one with _load_csv first")
        sch = self.schedule if format == "compute_comms" else self.schedule.compute_only()
        return {r: [str(a) for a in row] for r, row in enumerate(sch.actions)}

    def _dump_csv(self, filename: str | os.PathLike[str], format: str = "compute_only") -> None:
        """Write the order this schedule runs to ``filename`` in pippy's CSV format (readable by ``_load_csv``)."""
        _check_format(type(self).__name__, format)
        if self.schedule is None:
            raise ValueError(f"{type(self).__name__} has no training order to dump; load one with _load_csv first")
        buf = io.StringIO()
        to_csv(self.schedule if format == "compute_comms" else self.schedule.compute_only(), buf)
        with open(filename, "w", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())


def _check_format(name: str, format: str) -> None:
    if format not in _FORMATS:
        raise ValueError(f"{name}: format must be one of {list(_FORMATS)}, got {format!r}")

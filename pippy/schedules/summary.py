"""A schedule's short one-line repr, whatever its size (``str()`` lists every action)."""

from __future__ import annotations

from typing import Any

__all__ = ["schedule_repr"]


def schedule_repr(schedule: Any) -> str:
    """Name, ranks, stages, micro-batches, the action count and rank 0's first and last actions.

        >>> from pippy.schedules.generators import one_f_one_b
        >>> one_f_one_b(8, 32)
        Schedule('1f1b': 8 ranks, 8 stages, 32 microbatches, 512 actions; rank 0: 0F0 0F1 … 0B31; str() lists all)
    """
    acts = [str(a) for a in (schedule.actions[0] if schedule.actions else [])]
    head = " ".join(acts if len(acts) <= 3 else [*acts[:2], "…", acts[-1]])
    return (f"Schedule({schedule.name!r}: {schedule.num_ranks} ranks, {schedule.num_stages} stages, "
            f"{schedule.n_microbatches} microbatches, {sum(map(len, schedule.actions))} actions; rank 0: {head}; "
            "str() lists all)")

"""Process groups where a step failed, and the fresh group that later schedules on their ranks send on.

A gloo group where a step failed with messages in flight keeps its stale receives (held, see
:mod:`pippy.runtime.watch`) and its timed-out waits (which close connections), so a schedule built
there afterwards sends on a fresh group of the same ranks; one built before the failure refuses to run.
"""

from __future__ import annotations

import atexit
from typing import Any

from pippy.runtime.watch import group_alive

__all__ = ["fresh_of", "keep_fresh", "poison_group", "poisoned", "sending_group", "stale_reason"]

_POISONED: dict[int, Any] = {}  # id(group) -> group (held, so that the id is not reused)
_FRESH: dict[int, Any] = {}  # id(poisoned group) -> the fresh group later schedules use until it fails too
_WHY: dict[int, str] = {}  # id(group pippy sends on) -> the failure that poisoned it, for schedules built before it


@atexit.register  # runs before watch's exit hook (registered earlier), which collects what this lets go
def _forget_failed_groups() -> None:
    """At exit, let go of the groups kept for failed steps."""
    _POISONED.clear()
    _FRESH.clear()
    _WHY.clear()


def sending_group(group: Any) -> Any:
    """The group pippy's schedules send on for ``group``: the fresh one made after a failed step there, else ``group``.

    Collectives of the pipeline's ranks outside a step (gradient clipping) belong there too: after a step timed
    out, the old group's connections may be closed.

        >>> sending_group(None) is None
        True
    """
    if group is None or id(group) not in _POISONED:
        return group
    fresh = _FRESH.get(id(group))
    return fresh if fresh is not None and group_alive(fresh) else group


def poisoned(group: Any) -> bool:
    """Whether a step failed on ``group`` with messages in flight.

        >>> group = object()  # stands in for a process group
        >>> poisoned(group)
        False
        >>> poison_group(group, group, "rank 1 timed out"); poisoned(group)
        True
    """
    return id(group) in _POISONED


def fresh_of(group: Any) -> Any:
    """The fresh group made for the poisoned ``group``, or None.

        >>> group, fresh = object(), object()  # stand in for process groups
        >>> fresh_of(group) is None
        True
        >>> keep_fresh(group, fresh); fresh_of(group) is fresh
        True
    """
    return _FRESH.get(id(group))


def keep_fresh(group: Any, fresh: Any) -> None:
    """Make ``fresh`` the group that schedules on the poisoned ``group``'s ranks send on from now on.

        >>> group, fresh = object(), object()  # stand in for process groups
        >>> poison_group(group, group, "rank 1 timed out"); keep_fresh(group, fresh)
        >>> fresh_of(group) is fresh, stale_reason(group, fresh)  # schedules on fresh may run
        (True, None)
    """
    _FRESH[id(group)] = fresh


def poison_group(group: Any, p2p_group: Any, why: str) -> None:
    """Mark ``group`` as holding a failed step's messages; ``why`` is quoted to the schedules that sent on
    ``p2p_group`` (its fresh group, or itself) and were built before the failure.

    When the fresh group fails too, it is dropped, so that the next schedules make another:

        >>> group, fresh = object(), object()  # stand in for process groups
        >>> poison_group(group, group, "rank 1 timed out"); keep_fresh(group, fresh)
        >>> poison_group(group, fresh, "rank 0 raised ValueError")
        >>> fresh_of(group), stale_reason(group, fresh)
        (None, 'rank 0 raised ValueError')
    """
    _POISONED[id(group)] = group
    _WHY.setdefault(id(p2p_group), why or "a step failed")
    if _FRESH.get(id(group)) is p2p_group:
        del _FRESH[id(group)]


def stale_reason(group: Any, p2p_group: Any) -> str | None:
    """Why a schedule on ``group`` sending on ``p2p_group`` must not run (a later failure there), else None.

        >>> group = object()  # stands in for a process group
        >>> stale_reason(group, group) is None
        True
        >>> poison_group(group, group, "rank 1 timed out")
        >>> stale_reason(group, group)  # a schedule built before the failure, still sending on the old group
        'rank 1 timed out'
    """
    if id(group) not in _POISONED or _FRESH.get(id(group)) is p2p_group:
        return None
    return _WHY.get(id(p2p_group), "a step failed")

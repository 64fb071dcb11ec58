"""What the executor needs from a transport: the Transport protocol, who waits for what, how long a wait may take.

Two transports implement it: :class:`pippy.runtime.comm.DistTransport` (torch.distributed) and
:class:`pippy.runtime.localcomm.LocalTransport` (every rank in one process).

    >>> WaitContext(0, 1, "RECV_F", 2, 1).describe()
    'rank 0, stage 1, action 1RECV_F2 (micro-batch 2), peer rank 1'
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["DEFAULT_TIMEOUT", "Transport", "WaitContext", "default_timeout"]

DEFAULT_TIMEOUT = 300.0


def default_timeout() -> float:
    """Seconds a blocking wait may take: ``PIPPY_TIMEOUT`` from the environment, else 300."""
    return float(os.environ.get("PIPPY_TIMEOUT", DEFAULT_TIMEOUT))


@dataclass(frozen=True, slots=True)
class WaitContext:
    """Who waits for what, for error messages.

        >>> WaitContext(1, 2, "RECV_B", 3, 0, "grad of output 0").describe()
        'rank 1, stage 2, action 2RECV_B3 (micro-batch 3), peer rank 0: grad of output 0'
    """

    rank: int
    stage: int
    action: str
    mb: int
    peer: int
    what: str = ""

    def describe(self) -> str:
        """One line naming rank, stage, action, micro-batch and peer."""
        tail = f": {self.what}" if self.what else ""
        at = ("action step end (after every micro-batch)" if self.action == "END"
              else f"action {self.stage}{self.action}{self.mb} (micro-batch {self.mb})")
        return f"rank {self.rank}, stage {self.stage}, {at}, peer rank {self.peer}{tail}"


class Transport(Protocol):
    """What the executor needs from a transport: this rank, the group size, and bounded point-to-point messages.

    ``ordered`` is True when the backend matches messages between two ranks in posting order
    rather than by tag (NCCL): every rank then posts its messages in one global order, receives
    early where that order puts them (:mod:`pippy.runtime.postorder`).
    """

    rank: int
    world_size: int
    timeout: float
    ordered: bool

    def isend(self, tensor: torch.Tensor, peer: int, tag: int, ctx: WaitContext | None = None) -> Any:
        """Start sending ``tensor`` to ``peer``; never blocks (``ctx`` names the send if posting fails)."""

    def irecv(self, buffer: torch.Tensor, peer: int, tag: int, ctx: WaitContext | None = None) -> Any:
        """Start receiving into ``buffer`` from ``peer`` (``ctx`` names the receive if posting fails)."""

    def wait(self, handle: Any, ctx: WaitContext, host: bool = False) -> Iterator[None]:
        """Wait for ``handle``; raises PipeTimeoutError naming ``ctx`` after ``timeout`` seconds. ``host``: the
        caller reads the message on the host next (a shape header), so it must be in there, not only on the device."""

    def done(self, handle: Any) -> bool:
        """True when ``handle`` has completed (non-blocking)."""

    def arrived(self, handle: Any) -> bool:
        """True when the receive ``handle`` has its message (non-blocking; a later ``wait`` is still due)."""

    def fail(self, notice: str) -> bool:
        """Tell the other ranks this one failed (``notice`` says where and why), so their waits stop now.

        Returns whether they were told: the schedule then counts as failed for every rank.
        """

    def agree(self, facts: dict[str, Any], where: str) -> None:
        """Check every rank starts the same run (``facts``: schedule, micro-batches, placement, edges)."""

    def settle(self) -> None:
        """At the end of a step: check that what ``wait`` left to the device (NCCL) finished in time."""

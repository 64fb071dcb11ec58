"""In-process transport: every rank lives in this process and is driven cooperatively (tests, profiling).

    >>> t = LocalTransport.world(2)
    >>> h = t[0].isend(torch.ones(2), peer=1, tag=7)
    >>> buf = torch.empty(2); r = t[1].irecv(buf, peer=0, tag=7)
    >>> for _ in t[1].wait(r, WaitContext(1, 1, "RECV_F", 0, 0)): pass
    >>> buf.tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from pippy.runtime.comm import WaitContext, default_timeout

__all__ = ["LocalTransport"]


class _LocalHandle:
    __slots__ = ("buffer", "done", "key")

    def __init__(self, key: tuple[int, int, int], buffer: torch.Tensor | None, done: bool) -> None:
        self.key, self.buffer, self.done = key, buffer, done


class LocalTransport:
    """In-process transport: every rank lives in this process and is driven cooperatively.

    ``LocalTransport.world(n)`` returns one transport per rank sharing one mailbox. Messages match
    by tag. With ``ordered = True`` (set on every rank) it also checks what NCCL relies on: between
    two ranks, the k-th receive posted is for the k-th message sent (same tag), else it raises.
    """

    def __init__(
        self, rank: int, world_size: int, mailbox: dict[tuple[int, int, int], deque[torch.Tensor]], timeout: float,
        posted: dict[tuple[int, int], tuple[list[int], list[int]]] | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.ordered = False  # matched by tag, like gloo
        self._mailbox = mailbox
        self._posted = {} if posted is None else posted  # (src, dst) -> (tags sent, tags received), in order
        self.waiting: WaitContext | None = None

    @classmethod
    def world(cls, n: int, timeout: float | None = None) -> list[LocalTransport]:
        """One transport per rank 0..n-1, connected."""
        box: dict[tuple[int, int, int], deque[torch.Tensor]] = {}
        posted: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        t = default_timeout() if timeout is None else timeout
        return [cls(r, n, box, t, posted) for r in range(n)]

    def reset(self) -> None:
        """Drop every undelivered message (after a failed step)."""
        self._mailbox.clear()
        self._posted.clear()
        self.waiting = None

    def isend(self, tensor: torch.Tensor, peer: int, tag: int, ctx: WaitContext | None = None) -> Any:
        """Post a copy of ``tensor`` for ``peer``; completes at once."""
        if self.ordered:
            self._in_order(self.rank, peer, tag, 0, ctx)
        self._mailbox.setdefault((self.rank, peer, tag), deque()).append(tensor.detach().clone())
        return _LocalHandle((self.rank, peer, tag), None, True)

    def irecv(self, buffer: torch.Tensor, peer: int, tag: int, ctx: WaitContext | None = None) -> Any:
        """Register a receive; it completes when the matching send has been posted."""
        if self.ordered:
            self._in_order(peer, self.rank, tag, 1, ctx)
        h = _LocalHandle((peer, self.rank, tag), buffer, False)
        self._poll(h)
        return h

    def _in_order(self, src: int, dst: int, tag: int, side: int, ctx: WaitContext | None) -> None:
        """Log a send (``side`` 0) or receive (1) from ``src`` to ``dst``; raise if it pairs with another tag."""
        logs = self._posted.setdefault((src, dst), ([], []))
        mine, theirs = logs[side], logs[1 - side]
        k = len(mine)
        mine.append(tag)
        if k < len(theirs) and theirs[k] != tag:
            sent, got = (tag, theirs[k]) if side == 0 else (theirs[k], tag)
            where = ctx.describe() if ctx is not None else f"rank {self.rank}"
            raise RuntimeError(
                f"{where}: message {k} from rank {src} to rank {dst} was sent with tag {sent} but received with tag "
                f"{got}; a transport that matches in posting order (NCCL) would pair the wrong messages"
            )

    def _poll(self, h: _LocalHandle) -> None:
        q = self._mailbox.get(h.key)
        if not h.done and q:
            msg = q.popleft()
            if h.buffer is not None:
                if msg.shape != h.buffer.shape or msg.dtype != h.buffer.dtype:
                    raise RuntimeError(
                        f"rank {self.rank}: message from rank {h.key[0]} (tag {h.key[2]}) is {msg.dtype}{list(msg.shape)}, "
                        f"receive buffer is {h.buffer.dtype}{list(h.buffer.shape)}"
                    )
                h.buffer.copy_(msg)
            h.done = True

    def wait(self, handle: Any, ctx: WaitContext) -> Iterator[None]:
        """Yield until the message is there; the driver detects a stall across all ranks."""
        while True:
            self._poll(handle)
            if handle.done:
                self.waiting = None
                return
            self.waiting = ctx
            yield

    def done(self, handle: Any) -> bool:
        """Whether the handle has completed."""
        self._poll(handle)
        return bool(handle.done)

    def arrived(self, handle: Any) -> bool:
        """Whether a receive's message is in (same as :meth:`done` in-process)."""
        return self.done(handle)

    def fail(self, notice: str) -> bool:
        """Nothing to tell: the in-process driver sees every rank's error itself."""
        return False

    def agree(self, facts: dict[str, Any], where: str) -> None:
        """Nothing to compare: every in-process rank shares one pipe and one schedule class."""

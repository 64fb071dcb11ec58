"""In-process transport: every rank lives in this process and is driven cooperatively (tests, profiling).

    >>> t = LocalTransport.world(2)
    >>> h = t[0].isend(torch.ones(2), peer=1, tag=7)
    >>> buf = torch.empty(2); r = t[1].irecv(buf, peer=0, tag=7)
    >>> for _ in t[1].wait(r, WaitContext(1, 1, "RECV_F", 0, 0)): pass
    >>> buf.tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from pippy.runtime.transport import WaitContext, default_timeout

__all__ = ["LocalTransport"]


class _LocalHandle:
    __slots__ = ("buffer", "done", "key")

    def __init__(self, key: tuple[int, int, int], buffer: torch.Tensor | None, done: bool) -> None:
        self.key, self.buffer, self.done = key, buffer, done


class LocalTransport:
    """In-process transport: every rank lives in this process and is driven cooperatively.

    ``LocalTransport.world(n)`` returns one transport per rank sharing one mailbox. Messages match
    by tag; receives with the same peer and tag take their messages in the order they were posted
    (as gloo and NCCL match them), however they are polled. With ``ordered = True`` (set on every rank) it also checks what NCCL relies on: between
    two ranks, the k-th receive posted is for the k-th message sent (same tag); and every rank posts
    its messages in an order that agrees with every other rank's (:class:`Rendezvous`), else it raises.
    """

    def __init__(
        self, rank: int, world_size: int, mailbox: dict[tuple[int, int, int], deque[torch.Tensor]], timeout: float,
        posted: dict[tuple[int, int], tuple[list[int], list[int]]] | None = None, rendezvous: Rendezvous | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.ordered = False  # matched by tag, like gloo
        self._mailbox = mailbox
        self._posted = {} if posted is None else posted  # (src, dst) -> (tags sent, tags received), in order
        self._rendezvous = rendezvous if rendezvous is not None else Rendezvous()
        self._receives: dict[tuple[int, int, int], deque[_LocalHandle]] = {}  # open receives per key, oldest first
        self.waiting: WaitContext | None = None

    @classmethod
    def world(cls, n: int, timeout: float | None = None) -> list[LocalTransport]:
        """One transport per rank 0..n-1, connected."""
        box: dict[tuple[int, int, int], deque[torch.Tensor]] = {}
        posted: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        t = default_timeout() if timeout is None else timeout
        meet = Rendezvous()
        return [cls(r, n, box, t, posted, meet) for r in range(n)]

    def reset(self) -> None:
        """Drop every undelivered message (after a failed step)."""
        self._mailbox.clear()
        self._posted.clear()
        self._rendezvous.clear()
        self._receives.clear()
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
        self._receives.setdefault(h.key, deque()).append(h)
        self._poll(h)
        return h

    def _in_order(self, src: int, dst: int, tag: int, side: int, ctx: WaitContext | None) -> None:
        """Log a send (``side`` 0) or receive (1) from ``src`` to ``dst``; raise if it pairs with another tag."""
        logs = self._posted.setdefault((src, dst), ([], []))
        mine, theirs = logs[side], logs[1 - side]
        k = len(mine)
        mine.append(tag)
        self._rendezvous.post(self.rank, (src, dst, k), tag, ctx)
        if k < len(theirs) and theirs[k] != tag:
            sent, got = (tag, theirs[k]) if side == 0 else (theirs[k], tag)
            where = ctx.describe() if ctx is not None else f"rank {self.rank}"
            raise RuntimeError(
                f"{where}: message {k} from rank {src} to rank {dst} was sent with tag {sent} but received with tag "
                f"{got}; a transport that matches in posting order (NCCL) would pair the wrong messages"
            )

    def _poll(self, h: _LocalHandle) -> None:
        """Complete ``h`` if its message is in: the messages go to the open receives of its key in posting order."""
        q, waiting = self._mailbox.get(h.key), self._receives.get(h.key)
        while not h.done and q and waiting:
            msg, first = q.popleft(), waiting.popleft()
            if first.buffer is not None:
                if msg.shape != first.buffer.shape or msg.dtype != first.buffer.dtype:
                    raise RuntimeError(
                        f"rank {self.rank}: message from rank {h.key[0]} (tag {h.key[2]}) is {msg.dtype}{list(msg.shape)}, "
                        f"receive buffer is {first.buffer.dtype}{list(first.buffer.shape)}"
                    )
                first.buffer.copy_(msg)
            first.done = True

    def wait(self, handle: Any, ctx: WaitContext, host: bool = False) -> Iterator[None]:
        """Yield until the message is there (``host`` changes nothing in-process); the driver detects a stall."""
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

    def settle(self) -> None:
        """Nothing left to check: in-process waits finish on the host."""


class Rendezvous:
    """Checks that the ranks post their messages in orders that agree, as NCCL needs for large messages.

    NCCL runs a rank's sends and receives on one stream in posting order, and a send bigger than
    its buffers finishes only when its receive runs. Rank a posting [send x, receive y] while rank b
    posts [send y, receive x] then leaves both waiting forever. The orders agree when one global
    order of the messages contains each rank's; :meth:`post` keeps the "posted before" graph of
    messages (one chain per rank) and raises on the first cycle.

        >>> r = Rendezvous()
        >>> r.post(0, (0, 1, 0), 7, None); r.post(1, (1, 0, 0), 9, None)   # each rank sends first
        >>> r.post(0, (1, 0, 0), 9, None)
        >>> r.post(1, (0, 1, 0), 7, None)
        Traceback (most recent call last):
        ...
        RuntimeError: rank 1: posts message 0 from rank 0 to rank 1 (tag 7) after message 0 from rank 1 to rank 0 (tag 9), but the other ranks' orders put them the other way round (rank 0 posts message 0 from rank 0 to rank 1 (tag 7) before message 0 from rank 1 to rank 0 (tag 9)); NCCL, which runs a rank's messages in posting order and finishes a large send only when its receive runs, would wait forever here
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget every message (a failed step starts over)."""
        self._last: dict[int, tuple[int, int, int]] = {}  # rank -> the message it posted last
        self._after: dict[tuple[int, int, int], set[tuple[int, int, int]]] = {}  # message -> posted after it
        self._by: dict[tuple[tuple[int, int, int], tuple[int, int, int]], int] = {}  # edge -> the rank that made it
        self._tags: dict[tuple[int, int, int], int] = {}

    def post(self, rank: int, msg: tuple[int, int, int], tag: int, ctx: Any) -> None:
        """``rank`` posts its side of ``msg`` (src, dst, k-th of that pair): it comes after the rank's last one."""
        self._tags.setdefault(msg, tag)
        prev, self._last[rank] = self._last.get(rank), msg
        if prev is None or prev == msg:
            return
        path = self._path(msg, prev)
        if path is not None:
            where = ctx.describe() if ctx is not None else f"rank {rank}"
            chain = "; ".join(f"rank {self._by[(a, b)]} posts {self._name(a)} before {self._name(b)}"
                              for a, b in itertools.pairwise(path))
            raise RuntimeError(
                f"{where}: posts {self._name(msg)} after {self._name(prev)}, but the other ranks' orders put them the "
                f"other way round ({chain}); NCCL, which runs a rank's messages in posting order and finishes a "
                "large send only when its receive runs, would wait forever here"
            )
        self._after.setdefault(prev, set()).add(msg)
        self._by.setdefault((prev, msg), rank)

    def _path(self, start: tuple[int, int, int], goal: tuple[int, int, int]) -> list[tuple[int, int, int]] | None:
        """A chain of "posted before" edges from ``start`` to ``goal``, if any."""
        todo, seen = [[start]], {start}
        while todo:
            path = todo.pop()
            for nxt in self._after.get(path[-1], ()):
                if nxt == goal:
                    return [*path, nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append([*path, nxt])
        return None

    def _name(self, msg: tuple[int, int, int]) -> str:
        src, dst, k = msg
        return f"message {k} from rank {src} to rank {dst} (tag {self._tags[msg]})"

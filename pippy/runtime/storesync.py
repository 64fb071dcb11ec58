"""A barrier and a gather to rank 0 through the process group's store, ended by a failure notice or the timeout.

The trace of a step needs two collectives outside the step: a barrier (a common clock origin)
and a gather of every rank's events. Run on the process group, they would wait past pippy's
timeout and miss the failure board, and after a failed step the group's connections may be
closed. Through the store (small keys: an arrival mark, a pickled event list), a rank waiting
there checks the board as the step's own waits do, and stops with PipeAbortedError or
PipeTimeoutError naming who never came.

    >>> import torch.distributed as dist
    >>> from pippy.runtime.faults import FailureBoard
    >>> store = dist.HashStore()
    >>> sync = StoreSync(store, "demo", 0, 1, 5.0, FailureBoard(store, "demo", 0))
    >>> sync.barrier("rank 0, stage 0, action trace barrier")
    >>> sync.gather(["event"], "rank 0, stage 0, action trace gather")
    [['event']]
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from typing import Any

from pippy.runtime.comm import PipeAbortedError, PipeTimeoutError
from pippy.runtime.faults import FailureBoard
from pippy.runtime.watch import POLL

__all__ = ["StoreSync", "poll_keys"]


class StoreSync:
    """Barriers and gathers of one schedule's ranks in ``store`` under ``prefix`` (keys of a barrier are deleted at
    the next one; a gather's by rank 0 once read)."""

    def __init__(self, store: Any, prefix: str, rank: int, world: int, timeout: float, board: FailureBoard) -> None:
        self.store = store
        self.prefix = prefix
        self.rank = rank
        self.world = world
        self.timeout = timeout
        self.board = board
        self._barriers = 0
        self._gathers = 0

    def _wait(self, keys: dict[int, str], where: str) -> None:
        """Wait until every key of ``keys`` (rank -> key) exists; stop on a failure notice or after the timeout."""
        missing, notice = poll_keys(self.store, keys, self.timeout, self.board.failure)
        if notice is not None:
            raise PipeAbortedError(
                f"pipeline stopped at {where}: another rank failed first, so the ranks {missing} will never come "
                f"here. That rank says: {notice}"
            )
        if missing:
            raise PipeTimeoutError(
                f"pipeline wait timed out after {self.timeout:g}s at {where}: the ranks {missing} never came. "
                "Expected every rank to run the same steps with the same trace= setting (or PIPPY_TRACE on "
                "every rank); a rank may have failed or still be in an earlier step (see its own error). Raise "
                "the limit with timeout=... or PIPPY_TIMEOUT if a rank is just slow."
            )

    def barrier(self, where: str) -> None:
        """Return once every rank called its ``barrier`` as often as this one (``where`` names the wait in errors)."""
        n = self._barriers
        self._barriers += 1
        key = f"{self.prefix}/barrier/{n}/"
        self.store.set(f"{key}{self.rank}", "1")
        self._wait({r: f"{key}{r}" for r in range(self.world)}, where)
        if n:  # every rank is past barrier n - 1 now
            self.store.delete_key(f"{self.prefix}/barrier/{n - 1}/{self.rank}")

    def gather(self, obj: Any, where: str) -> list[Any] | None:
        """Every rank's ``obj`` (picklable) in rank order on rank 0, else None; only rank 0 waits."""
        n = self._gathers
        self._gathers += 1
        keys = {r: f"{self.prefix}/gather/{n}/{r}" for r in range(self.world)}
        if self.rank != 0:
            self.store.set(keys[self.rank], pickle.dumps(obj))
            return None
        self._wait({r: k for r, k in keys.items() if r != 0}, where)
        out = [obj]
        for r in range(1, self.world):
            out.append(pickle.loads(self.store.get(keys[r])))
            self.store.delete_key(keys[r])
        return out


def poll_keys(store: Any, keys: dict[int, str], timeout: float,
              failure: Callable[[], str | None]) -> tuple[list[int], str | None]:
    """Wait until every key of ``keys`` exists in ``store``, a failure notice is posted, or ``timeout`` passes;
    returns the still missing ones and the notice (``([], None)``: all came). Naps start short, so that ranks
    leaving a barrier stay close together.

        >>> import torch.distributed as dist
        >>> store = dist.HashStore(); store.set("a", "1")
        >>> poll_keys(store, {0: "a"}, 1.0, lambda: None), poll_keys(store, {1: "b"}, 0.01, lambda: None)
        (([], None), ([1], None))
    """
    start, nap = time.monotonic(), 0.0005
    while True:
        missing = [r for r, k in keys.items() if not store.check([k])]
        if not missing:
            return [], None
        notice = failure()
        if notice is not None or time.monotonic() - start > timeout:
            return missing, notice
        time.sleep(nap)
        nap = min(nap * 2, POLL)


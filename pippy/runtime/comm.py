"""Point-to-point transport between ranks over torch.distributed (gloo/NCCL), every wait bounded.

Waits are generators so that one executor serves every transport: over torch.distributed a
wait blocks (with a timeout) and never yields; in-process (:mod:`pippy.runtime.localcomm`), a
wait yields until the message is there, which lets one process drive every rank cooperatively
(tests, profiling). The protocol both implement is :class:`pippy.runtime.transport.Transport`.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pippy.runtime.failedgroups import fresh_of, keep_fresh, poison_group, poisoned, sending_group, stale_reason
from pippy.runtime.faults import FailureBoard, agree
from pippy.runtime.transport import DEFAULT_TIMEOUT, Transport, WaitContext, default_timeout
from pippy.runtime.watch import POLL, Waiter, Watched, drop_at_exit, group_alive, group_store

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistTransport",
    "PipeAbortedError",
    "PipeCommError",
    "PipeTimeoutError",
    "Transport",
    "WaitContext",
    "default_timeout",
    "sending_group",
]


class PipeCommError(RuntimeError):
    """A pipeline send/receive failed; the message says who waited for what.

    The base of :class:`PipeTimeoutError` and :class:`PipeAbortedError`: one ``except`` takes every failed wait
    (here rank 0 of 2 waits 0.01 s at a barrier that rank 1 never reaches):

        >>> from pippy.runtime.faults import FailureBoard
        >>> from pippy.runtime.storesync import StoreSync
        >>> store = dist.HashStore()
        >>> try:
        ...     StoreSync(store, "demo", 0, 2, 0.01, FailureBoard(store, "demo", 0)).barrier("rank 0, trace barrier")
        ... except PipeCommError as err:
        ...     print(type(err).__name__)
        PipeTimeoutError
    """


class PipeTimeoutError(PipeCommError):
    """A pipeline wait ran out of time; the message says who waited for what.

        >>> from pippy.runtime.faults import FailureBoard
        >>> from pippy.runtime.storesync import StoreSync
        >>> store = dist.HashStore()
        >>> sync = StoreSync(store, "demo", 0, 2, 0.01, FailureBoard(store, "demo", 0))  # rank 0 of 2, 0.01 s
        >>> sync.barrier("rank 0, trace barrier")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        pippy.runtime.comm.PipeTimeoutError: pipeline wait timed out after 0.01s at rank 0, trace barrier: the ranks [1] never came. ...
    """


class PipeAbortedError(PipeCommError):
    """Another rank of the pipeline failed; the message says who waited for what, and which rank failed where.

    A failing rank posts one line on the group's failure board; a rank waiting for it stops at once:

        >>> from pippy.runtime.faults import FailureBoard
        >>> from pippy.runtime.storesync import StoreSync
        >>> store = dist.HashStore()
        >>> FailureBoard(store, "demo", 1).post("rank 1, stage 1, action 1F0: ValueError: bad input")
        >>> StoreSync(store, "demo", 0, 2, 60.0, FailureBoard(store, "demo", 0)).barrier("rank 0, trace barrier")
        Traceback (most recent call last):
        pippy.runtime.comm.PipeAbortedError: pipeline stopped at rank 0, trace barrier: another rank failed first, so the ranks [1] will never come here. That rank says: rank 1, stage 1, action 1F0: ValueError: bad input
    """


EDGE_TAGS = 1 << 28  # message tags of one schedule: edges below, then headers, tied grads, generation (plan.Edge.tag)


def _aborted_message(ctx: WaitContext, notice: str) -> str:
    return (
        f"pipeline stopped at {ctx.describe()}: another rank failed first, so what this rank waits for will never "
        f"come. That rank says: {notice}"
    )


def _timeout_message(ctx: WaitContext, timeout: float, cause: str) -> str:
    kind = "activations" if ctx.action.endswith("F") else "its step-end message" if ctx.action == "END" else "gradients"
    if ctx.action.startswith("SEND"):
        expect = f"Expected rank {ctx.peer} to receive {kind} sent from here; it never took them"
    else:
        expect = f"Expected {kind} from rank {ctx.peer}, got nothing"
    return (
        f"pipeline wait timed out after {timeout:g}s at {ctx.describe()}. {expect}. Likely causes: rank {ctx.peer} failed or is still in an earlier step (see its own error), "
        "ranks run different schedules or micro-batch counts, or step() was not called on every rank (or one rank "
        "called eval() where the others called step(), or ranks stepped two pipelines over the same ranks in "
        "different orders). "
        f"Raise the limit with timeout=... or PIPPY_TIMEOUT if a stage is just slow. [{cause}]"
    )


def backend_name(group: Any = None, device: Any = None) -> str:
    """The backend that moves ``device``'s tensors in ``group`` (``"gloo"``, ``"nccl"``, ...), lower case.

    A group made without naming a backend (``init_process_group()``) reports ``"undefined"`` and
    serves each device type with its own (``"cpu:gloo,cuda:nccl"``): the stage's device picks one.
    """
    name = str(dist.get_backend(group)).lower()
    try:
        config = str(dist.get_backend_config(group)).lower()
    except Exception:  # an older or third-party group without a per-device config
        return name
    per_device = dict(part.split(":", 1) for part in config.split(",") if ":" in part)
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind in per_device:
        return per_device[kind]
    return next(iter(per_device.values())) if len(set(per_device.values())) == 1 else name


class DistTransport:
    """P2P over a torch.distributed process group (ranks are group ranks).

    Under an initialized process group (e.g. torchrun), ``DistTransport(group=None, timeout=60.0)``
    talks to the ranks of the default group; on gloo, a failure it posts reaches every rank's waits:

        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> t = DistTransport(timeout=60.0)
        >>> t.rank, t.world_size, t.timeout, t.ordered  # gloo matches messages by tag, not posting order
        (0, 1, 60.0, False)
        >>> t.fail("rank 0, stage 0, action 0F1: ValueError: bad input"), t.board.failure()
        (True, 'rank 0, stage 0, action 0F1: ValueError: bad input')
        >>> dist.destroy_process_group()
    """

    _warned = False

    def __init__(self, group: Any = None, timeout: float | None = None, device: Any = None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        backend = backend_name(self.group, device)
        # gloo matches messages by tag; NCCL and others match them in posting order per rank pair
        self.ordered = "gloo" not in backend
        if self.ordered and not DistTransport._warned:
            DistTransport._warned = True
            warnings.warn(
                f"pippy on backend {backend!r}: messages between two ranks are matched in posting order, not by tag. "
                "Every rank posts its messages in one global order taken from the schedule, receives early where "
                "that order puts them (checked in-process for every schedule); this backend itself is untested with "
                "pippy.",
                stacklevel=2,
            )
        self.timeout = default_timeout() if timeout is None else float(timeout)
        # NCCL: a wait only makes the compute stream wait (no host sync per message); its deadline is checked at the
        # step's end (settle), where the host waits anyway for the step's results
        self._stream_waits = backend == "nccl"
        self._unsettled: deque[tuple[Any, WaitContext, float]] = deque()
        # gloo: a failure board on the group's store, checked while waiting (NCCL waits stay on the caller's stream)
        self._store = None if self.ordered else group_store(self.group)
        self.board: FailureBoard | None = None
        self._agreements = 0  # rounds of agree(): one per order installed (a CSV loaded later starts a new one)
        self._prefix = ""
        if self._store is not None:
            ranks = tuple(dist.get_process_group_ranks(self.group))
            self._ranks = ranks
            self._p2p_rank: list[int] | None = None  # caller's group rank -> rank in p2p_group (None: the same)
            self.p2p_group = self.group
            if poisoned(self.group):
                self.p2p_group, self._p2p_rank = self._fresh_group(ranks)
        else:
            self._ranks = ()
            self.p2p_group, self._p2p_rank = self.group, None
        self._waiter = Waiter()
        self._send_waiter = Waiter()  # gloo: waits each send in the background, so it can be dropped once sent
        drop_at_exit(self, "group", "p2p_group")
        members = tuple(dist.get_process_group_ranks(self.group)) if self.group is not None else ()
        self.rank_note = "" if members == tuple(range(dist.get_world_size())) else (
            f"pippy: ranks in this message are positions in the pipeline's group, whose members are the global "
            f"ranks {list(members)} (rank k is global rank {list(members)}[k]); this process is global rank "
            f"{dist.get_rank()}")

    def _fresh_group(self, ranks: tuple[int, ...]) -> tuple[Any, list[int]]:
        """The group this schedule sends on after a failed step on ``ranks`` (made here, by every member at once)."""
        fresh = fresh_of(self.group)
        if fresh is None or not group_alive(fresh):
            try:
                fresh = dist.new_group(ranks=list(ranks), backend="gloo", use_local_synchronization=True,
                                       timeout=timedelta(seconds=self.timeout))
            except Exception as exc:
                raise PipeTimeoutError(
                    f"rank {self.rank}: a step failed earlier on the ranks {list(ranks)}, so this schedule sends on a "
                    f"new process group of theirs, which every one of them makes when it builds its next schedule; "
                    f"making it failed within {self.timeout:g}s ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
                    "Expected every rank to build a new schedule after the failure; build it on every rank"
                ) from exc
            keep_fresh(self.group, fresh)
        order = dist.get_process_group_ranks(fresh)
        return fresh, [order.index(g) for g in ranks]

    def poison(self, why: str = "") -> None:
        """Mark this group as holding a failed step's messages: later schedules on its ranks send on a fresh group.

        ``why`` (the failure) is quoted to schedules built earlier on the same group, which then refuse to run
        (:meth:`stale`).
        """
        if self._ranks:
            poison_group(self.group, self.p2p_group, why)

    def stale(self) -> str | None:
        """Why this schedule must not run: another schedule on the group it sends on failed after it was built (its
        abandoned receives there could take this one's messages); None when it may run.

            >>> DistTransport.__new__(DistTransport).stale() is None   # (no group: nothing to say)
            True
        """
        ranks = getattr(self, "_ranks", ())
        return stale_reason(self.group, self.p2p_group) if ranks else None

    def board_store(self) -> tuple[Any, str, FailureBoard] | None:
        """The store, key prefix and failure board this schedule's ranks share (gloo), else None."""
        board = self._claim()
        return None if board is None else (self._store, self._prefix, board)

    def parity(self) -> int:
        """This schedule's number among those over its group, mod 2 (claimed at its first step; 0 without a store):
        two pipelines over the same ranks tag their messages apart, so ranks that step them in different orders
        wait and time out instead of taking each other's activations."""
        return int(self._prefix.rsplit("/", 1)[-1]) % 2 if self._claim() is not None else 0

    def _claim(self) -> FailureBoard | None:
        """This transport's failure board, keyed the first time a step uses it by how many transports of the group
        this rank had used before on the group's store (counted in the store): the same number on every rank that
        runs the same schedules, however many others each built and left unused."""
        if self.board is None and self._store is not None:
            name = "-".join(map(str, self._ranks))
            n = int(self._store.add(f"pippy/{name}/used/{self.rank}", 1))
            self._prefix = f"pippy/{name}/{n}"
            self.board = FailureBoard(self._store, self._prefix, self.rank)
        return self.board

    def fail(self, notice: str) -> bool:
        """Post ``notice`` on the failure board (first notice wins); True when there is a board."""
        board = self._claim()
        if board is None:
            return False
        board.post(notice)
        return True

    def agree(self, facts: dict[str, Any], where: str) -> None:
        """Compare ``facts`` with every rank of the group through the store (see :func:`pippy.runtime.faults.agree`).

        Each call is a new round, compared only with the other ranks' same round.
        """
        if self._claim() is not None:
            self._agreements += 1
            agree(self._store, f"{self._prefix}/round{self._agreements}", self.rank, range(self.world_size), facts,
                  where)

    def isend(self, tensor: torch.Tensor, peer: int, tag: int, ctx: WaitContext | None = None) -> Any:
        """Start an asynchronous send.

        On gloo, whose ``is_completed`` stays False until ``wait``, a background thread waits for
        it: :meth:`done` then turns True once the message is out, and the executor drops the
        send (and frees its tensor) at once rather than at the end of the step.
        """
        try:
            dst = peer if self._p2p_rank is None else self._p2p_rank[peer]
            work = dist.isend(tensor, group=self.p2p_group, tag=tag, group_dst=dst)
        except RuntimeError as exc:
            raise self._posting_failed(exc, peer, ctx) from exc
        if self.ordered:
            return work
        watched = Watched(work)
        self._send_waiter.submit(watched, self.timeout)
        return watched

    def irecv(self, buffer: torch.Tensor, peer: int, tag: int, ctx: WaitContext | None = None) -> Any:
        """Start an asynchronous receive."""
        try:
            src = peer if self._p2p_rank is None else self._p2p_rank[peer]
            work = dist.irecv(buffer, group=self.p2p_group, tag=tag, group_src=src)
        except RuntimeError as exc:
            raise self._posting_failed(exc, peer, ctx) from exc
        # gloo only: there ``is_completed`` stays False until ``wait``, so arrival needs a watcher;
        # on NCCL ``is_completed`` answers and ``wait`` must run on the caller's stream
        return work if self.ordered else Watched(work, held=True)

    def arrived(self, handle: Any) -> bool:
        """Whether a receive's message is in. gloo's ``is_completed`` stays False until ``wait``, so the
        first call hands the wait to a daemon thread (it never holds up exit) and later calls ask it."""
        if not isinstance(handle, Watched):
            return self.done(handle)
        handle.watch(self.timeout)
        return handle.finished.is_set()

    def wait(self, handle: Any, ctx: WaitContext, host: bool = False) -> Iterator[None]:
        """Block until done or ``timeout`` seconds pass (then raise PipeTimeoutError).

        On NCCL only the compute stream waits (see :meth:`settle`), unless ``host``: a value read on the host next
        (a shape header) is waited for there, within the timeout, with every message waited for before it.

        With a failure board, the wait runs on a watcher thread while this one checks the board
        every 50 ms: when another rank posted a failure, raise PipeAbortedError at once.
        """
        board = self._claim()
        try:
            if board is not None:
                ok = self._wait_watching(handle, ctx, board)
            elif isinstance(handle, Watched):
                ok = handle.result(self.timeout)
            elif self._stream_waits:  # (a wait with a timeout would hold the host until the message is in)
                self._unsettled.append((handle, ctx, time.monotonic() + self.timeout))
                ok = handle.wait()
                self._check_oldest(block=host)
            else:
                ok = handle.wait(timeout=timedelta(seconds=self.timeout))
        except PipeCommError:
            raise
        except RuntimeError as exc:
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            notice = board.failure() if board is not None else None
            if notice is not None:  # the peer posted why it stopped before its connection went
                raise PipeAbortedError(_aborted_message(ctx, notice)) from exc
            if "timeout" in cause.lower() or "timed out" in cause.lower():
                raise PipeTimeoutError(_timeout_message(ctx, self.timeout, cause)) from exc
            raise PipeCommError(
                f"pipeline communication failed at {ctx.describe()}: {cause}. The peer rank {ctx.peer} probably "
                "exited or crashed first; look for its own error above."
            ) from exc
        if ok is False:
            raise PipeTimeoutError(_timeout_message(ctx, self.timeout, "wait returned False"))
        return iter(())

    def settle(self) -> None:
        """Block until every message waited on the stream only (NCCL) is done, each within ``timeout`` seconds of its
        wait; raise :class:`PipeTimeoutError` naming the first that is not."""
        while self._unsettled:
            self._check_oldest(block=True)

    def _check_oldest(self, block: bool = False) -> None:
        """Drop the finished messages at the front of those waited on the stream only; raise when the oldest one left
        is past its deadline. With ``block``, wait (until its deadline) for the oldest to finish."""
        while self._unsettled:
            handle, ctx, deadline = self._unsettled[0]
            try:
                while not handle.is_completed():
                    if time.monotonic() > deadline:
                        raise PipeTimeoutError(_timeout_message(ctx, self.timeout, "not done on the device in time"))
                    if not block:
                        return
                    time.sleep(POLL / 50)
            except PipeCommError:
                self._unsettled.clear()
                raise
            except RuntimeError as exc:  # the backend reports a failed message here
                self._unsettled.clear()
                cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise PipeCommError(
                    f"pipeline communication failed at {ctx.describe()}: {cause}. The peer rank {ctx.peer} probably "
                    "exited or crashed first; look for its own error above."
                ) from exc
            self._unsettled.popleft()

    def _posting_failed(self, exc: RuntimeError, peer: int, ctx: WaitContext | None) -> PipeCommError:
        where = ctx.describe() if ctx is not None else f"rank {self.rank}, peer rank {peer}"
        notice = self.board.failure() if self.board is not None else None
        if notice is not None:
            return PipeAbortedError(_aborted_message(ctx, notice) if ctx is not None else f"{where}: {notice}")
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return PipeCommError(
            f"pipeline communication failed at {where}: {cause}. The peer rank {peer} probably exited or crashed "
            "first; look for its own error above."
        )

    def _wait_watching(self, handle: Any, ctx: WaitContext, board: FailureBoard) -> Any:
        watched = handle if isinstance(handle, Watched) else Watched(handle)
        if not watched.watched:  # not already watched for bubble filling
            self._waiter.submit(watched, self.timeout)
        while not watched.finished.wait(POLL):
            notice = board.failure()
            if notice is not None:
                raise PipeAbortedError(_aborted_message(ctx, notice))
            if not group_alive(self.group):
                raise PipeCommError(
                    f"pipeline stopped at {ctx.describe()}: the process group was destroyed while this rank waited "
                    "(destroy_process_group() during a step). Expected the group to live until every rank's step() "
                    "returned; destroy it only after the last step."
                )
        return watched.result(self.timeout)

    def done(self, handle: Any) -> bool:
        """Whether the work has completed."""
        if isinstance(handle, Watched):
            return handle.finished.is_set() if handle.watched else bool(handle.work.is_completed())
        return bool(handle.is_completed())


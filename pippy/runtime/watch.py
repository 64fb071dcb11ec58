"""Waits that can be watched: a gloo work waited on another thread, so the waiting rank can check for failures meanwhile.

gloo cannot cancel a receive or poll whether it arrived (``is_completed`` stays False until
``wait``). So a wait that must stay responsive runs on a watcher thread (:class:`Watched`, one
:class:`Waiter` thread per transport), and the executor's thread checks the failure board and the
process group every :data:`POLL` seconds. A wait abandoned because another rank failed may stay
inside gloo; at interpreter exit :func:`settle_watchers` lets such waits end first.

A gloo worker thread still drops its last tensor references after the caller's wait returned; if
the interpreter is finalizing by then, the thread dies holding C++ frames and the process aborts
("terminate called without an active exception"). That happens whenever a process group outlives
``destroy_process_group`` up to the interpreter's exit, held by a reference cycle or a global. So
at exit pippy lets go of the groups its objects hold (:func:`drop_at_exit`) and collects the
garbage: the groups are destroyed then, and torch joins their worker threads while it still can.

A posted gloo receive whose work object is freed before its message arrives wedges the
connection to that peer (the message can never be read, nor anything after it, collectives
included), so every posted receive (``Watched(work, held=True)``) is held until its wait has
returned, forever if it never does (a few buffers per failed step).

    >>> class Done:
    ...     def wait(self, timeout):
    ...         return True
    >>> w = Watched(Done())
    >>> Waiter().submit(w, 1.0)
    >>> w.result(1.0)
    True
"""

from __future__ import annotations

import atexit
import gc
import queue
import threading
import time
import weakref
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = ["POLL", "Waiter", "Watched", "drop_at_exit", "group_alive", "group_store", "settle_watchers"]

POLL = 0.05  # seconds between checks of the failure board while a wait is pending
_WATCHING: set[Watched] = set()  # watched works whose wait has not returned yet
_HELD: set[Watched] = set()  # posted receives whose wait has not returned: never freed before it does
_EXIT_GRACE = 10.0  # seconds the interpreter's exit waits for them
_DROP: list[tuple[weakref.ref[Any], tuple[str, ...]]] = []  # (holder, its process-group attributes) for exit


def drop_at_exit(holder: Any, *names: str) -> None:
    """At interpreter exit, set ``holder``'s attributes ``names`` (process groups) to None (see the module docstring).

        >>> class Holder:
        ...     group = "a process group"
        >>> h = Holder()
        >>> drop_at_exit(h, "group")
        >>> _release_groups([_DROP.pop()])   # what the exit hook does with every registered holder
        >>> h.group is None
        True
    """
    if len(_DROP) >= 64 and not len(_DROP) & (len(_DROP) - 1):  # now and then, forget holders already gone
        _DROP[:] = [(ref, n) for ref, n in _DROP if ref() is not None]
    _DROP.append((weakref.ref(holder), names))


def _release_groups(entries: list[tuple[weakref.ref[Any], tuple[str, ...]]]) -> None:
    """Drop the process groups of ``entries`` (registered with :func:`drop_at_exit`), then collect reference cycles."""
    for ref, names in entries:
        holder = ref()
        for name in names if holder is not None else ():
            try:
                setattr(holder, name, None)
            except Exception:  # a read-only attribute: that group stays until finalization
                pass
    entries.clear()
    gc.collect()


@atexit.register
def _at_exit() -> None:
    """Settle abandoned waits, then let go of process groups while worker threads can still take the GIL."""
    settle_watchers()
    if not _WATCHING:  # a wait still inside gloo would need its group: leave the groups to finalization
        _release_groups(_DROP)


def settle_watchers() -> None:
    """At exit, let waits abandoned by a failed step end before the interpreter does.

    A watcher thread still inside gloo's wait when the interpreter finalizes would crash the
    process on its way back ("terminate called without an active exception"). The waits end
    when the peers close their connections; destroying this rank's group closes ours, so that
    ranks exiting together free each other's watchers instead of waiting for one another.
    """
    if not _WATCHING:
        return
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # already going down: the grace below still applies
        pass
    deadline = time.monotonic() + _EXIT_GRACE
    for w in list(_WATCHING):
        w.finished.wait(max(0.0, deadline - time.monotonic()))


def group_alive(group: Any) -> bool:
    """Whether ``group`` still exists (it does not after ``destroy_process_group``).

        >>> group_alive(None)   # no process group in this process
        False
    """
    if not dist.is_initialized():
        return False
    try:
        dist.get_process_group_ranks(group)
    except (RuntimeError, ValueError, KeyError):
        return False
    return True


def group_store(group: Any) -> Any:
    """The store the process group was made with (None where torch does not say).

        >>> import torch.distributed as dist
        >>> store = dist.HashStore()
        >>> _ = dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        >>> group_store(dist.group.WORLD) is not None, group_alive(dist.group.WORLD)
        (True, True)
        >>> dist.destroy_process_group()
    """
    try:
        from torch.distributed.distributed_c10d import _get_process_group_store

        return _get_process_group_store(group)
    except Exception:  # a torch without it, or a group it does not know: waits stay bounded by the timeout
        return None


class Watched:
    """A torch.distributed work (a receive, or any work waited on next to a failure board) plus its watcher thread."""

    __slots__ = ("finished", "outcome", "watched", "work")

    def __init__(self, work: Any, *, held: bool = False) -> None:
        self.work = work
        self.finished = threading.Event()
        self.outcome: tuple[Any, BaseException | None] | None = None  # (wait's value, its exception)
        self.watched = False
        if held:  # a posted receive: kept until its wait returns (see the module docstring)
            _HELD.add(self)

    def watch(self, timeout: float) -> None:
        """Start the watcher thread (once)."""
        if self.watched:
            return
        self.watched = True

        _WATCHING.add(self)
        threading.Thread(target=_wait_and_drop, args=([self], timeout), name="pippy-recv-watch", daemon=True).start()

    def run_wait(self, timeout: float) -> threading.Event:
        """Wait for the work (on a watcher thread) and record how it ended; the caller sets the event returned
        once it holds no reference to this object (see :func:`_wait_and_drop`)."""
        try:
            self.outcome = (self.work.wait(timeout=timedelta(seconds=timeout)), None)
        except BaseException as exc:  # handed to result(), raised on the executor's thread
            self.outcome = (None, exc)
        _WATCHING.discard(self)
        _HELD.discard(self)
        return self.finished


    def result(self, timeout: float) -> Any:
        """What ``work.wait`` returned, waiting here (``timeout`` s) or on the watcher; re-raises its error."""
        if not self.watched:
            try:
                return self.work.wait(timeout=timedelta(seconds=timeout))
            finally:
                _HELD.discard(self)
        self.finished.wait()  # bounded: the watcher's own wait has the timeout
        assert self.outcome is not None
        value, exc = self.outcome
        if exc is not None:
            raise exc
        return value


class Waiter:
    """One daemon thread per transport that runs the blocking waits handed to it, one after another.

    Cheaper than a thread per wait: the executor waits for one message at a time, and meanwhile
    checks the failure board.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Watched, float] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, w: Watched, timeout: float) -> None:
        """Have ``w`` waited for (``w.finished`` is set when its wait returns)."""
        w.watched = True
        _WATCHING.add(w)
        if self._thread is None:  # the thread holds only the queue: when this waiter goes, its thread ends
            self._thread = threading.Thread(target=_serve, args=(self._jobs,), name="pippy-waiter", daemon=True)
            self._thread.start()
            weakref.finalize(self, self._jobs.put, None)
        self._jobs.put((w, timeout))


def _serve(jobs: queue.SimpleQueue[tuple[Watched, float] | None]) -> None:
    """A waiter thread: run the waits handed to it in turn, until its waiter is gone (``None``)."""
    while True:
        job = jobs.get()
        if job is None:
            return
        box: list[Any] = list(job)  # [watched, timeout]: no other name holds the watched
        del job
        timeout = box.pop()
        _wait_and_drop(box, timeout)


def _wait_and_drop(box: list[Watched], timeout: float) -> None:
    """Run ``box``'s wait, drop this thread's reference, then signal: the executor's thread then holds the
    last reference to the work and its tensor, so a message buffer is freed there, at its last use, and not
    kept by a watcher until its next job (nor freed on a thread that memory profilers do not follow)."""
    finished = box.pop().run_wait(timeout)
    finished.set()

"""NCCL waits: a receive only makes the compute stream wait (no host sync per message); deadlines are checked later."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import pytest

from pippy.runtime.comm import DistTransport, PipeCommError, PipeTimeoutError, WaitContext


class FakeWork:
    """A backend work handle: ``wait()`` with no timeout returns at once (NCCL's stream wait)."""

    def __init__(self, done_after: float | None = 0.0, fails: bool = False) -> None:
        self.t0, self.done_after, self.fails = time.monotonic(), done_after, fails
        self.waits: list[dict[str, Any]] = []

    def wait(self, **kw: Any) -> bool:
        self.waits.append(kw)
        return True

    def is_completed(self) -> bool:
        if self.fails:
            raise RuntimeError("NCCL error: remote process exited")
        return self.done_after is not None and time.monotonic() - self.t0 >= self.done_after


def _nccl(timeout: float) -> DistTransport:
    t = DistTransport.__new__(DistTransport)  # the NCCL path of a transport, without a process group
    t.timeout, t.board, t._store, t._stream_waits, t._unsettled = timeout, None, None, True, deque()
    return t


CTX = WaitContext(1, 2, "RECV_F", 3, 0, "input 0")


def test_a_wait_never_holds_the_host_and_settle_checks_the_deadline() -> None:
    t = _nccl(timeout=5.0)
    slow = FakeWork(done_after=0.2)
    start = time.monotonic()
    list(t.wait(slow, CTX))
    assert slow.waits == [{}]  # no timeout= : the stream waits, not the host
    assert time.monotonic() - start < 0.1
    t.settle()  # blocks until the message is in
    assert time.monotonic() - start >= 0.2 and not t._unsettled


def test_a_message_that_never_comes_times_out_naming_who_waited() -> None:
    t = _nccl(timeout=0.2)
    list(t.wait(FakeWork(done_after=None), CTX))
    start = time.monotonic()
    with pytest.raises(PipeTimeoutError, match=r"timed out after 0.2s at rank 1, stage 2, action 2RECV_F3 "
                                               r"\(micro-batch 3\), peer rank 0: input 0.*not done on the device"):
        t.settle()
    assert time.monotonic() - start < 1.0


def test_a_late_message_is_named_at_the_next_wait_and_finished_ones_are_dropped() -> None:
    t = _nccl(timeout=0.1)
    list(t.wait(FakeWork(), CTX))
    list(t.wait(FakeWork(done_after=None), CTX))
    assert len(t._unsettled) == 1  # the finished one went at once
    time.sleep(0.15)
    with pytest.raises(PipeTimeoutError, match="2RECV_F3"):
        list(t.wait(FakeWork(), CTX))


def test_a_failed_message_raises_a_comm_error_naming_the_peer() -> None:
    t = _nccl(timeout=5.0)
    with pytest.raises(PipeCommError, match=r"communication failed at rank 1, stage 2.*remote process exited.*peer "
                                            r"rank 0 probably exited"):
        list(t.wait(FakeWork(fails=True), CTX))  # reported by the backend as soon as it is asked
    assert not t._unsettled


def test_a_value_read_on_the_host_is_waited_for_there_within_the_timeout() -> None:
    """A shape header (or the generation ring's tokens) is read on the host next: its wait must hold the host, bounded
    (reading it unwaited would block in the device sync with no deadline)."""
    t = _nccl(timeout=0.2)
    ready = FakeWork(done_after=0.1)
    start = time.monotonic()
    list(t.wait(ready, CTX, host=True))
    assert 0.1 <= time.monotonic() - start < 0.5 and not t._unsettled
    with pytest.raises(PipeTimeoutError, match="2RECV_F3"):
        list(t.wait(FakeWork(done_after=None), CTX, host=True))
    assert time.monotonic() - start < 1.0

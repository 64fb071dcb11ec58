"""pippy.runtime.watch: at exit, process groups held by pippy's objects are let go before finalization."""

from __future__ import annotations

import gc
import weakref

import torch.distributed as dist

from pippy.runtime import watch
from pippy.runtime.comm import DistTransport


def _entries(holder: object) -> list:
    return [e for e in watch._DROP if e[0]() is holder]


def test_live_transport_lets_go_of_its_group(world_of_one) -> None:
    """A transport still referenced at exit (a global, say) no longer keeps its group alive: torch can destroy
    the group and join its worker threads while the interpreter still runs."""
    transport = DistTransport(timeout=5.0)
    group = weakref.ref(transport.group)
    dist.destroy_process_group()
    gc.collect()
    assert group() is not None, "the transport should still hold the group here"
    watch._release_groups(_entries(transport))
    assert transport.group is None and transport.p2p_group is None
    assert group() is None


def test_group_in_a_reference_cycle_is_collected(world_of_one) -> None:
    """A group reachable only through a cycle of dead objects (schedules make such cycles) is freed by the exit
    hook's collection, not left to the interpreter's finalization."""
    transport = DistTransport(timeout=5.0)
    transport.cycle = transport  # type: ignore[attr-defined]
    group = weakref.ref(transport.group)
    dist.destroy_process_group()
    gc.disable()
    try:
        del transport
        assert group() is not None
        watch._release_groups([])
        assert group() is None
    finally:
        gc.enable()


def test_holders_are_weak_and_pruned() -> None:
    """Registering does not keep a holder alive, and dead holders are forgotten as the list grows."""

    class Holder:
        group = "a group"

    kept = Holder()
    watch.drop_at_exit(kept, "group")
    before = len(watch._DROP)
    for _ in range(200):
        watch.drop_at_exit(Holder(), "group")
    assert len(watch._DROP) < before + 200
    entries = _entries(kept)
    assert len(entries) == 1
    watch._DROP.remove(entries[0])


def test_waiter_threads_end_with_their_waiter() -> None:
    """Each transport waits on its own threads; dropping the transport ends them (they leaked: +2 threads per
    schedule built and stepped, 401 threads after 200 schedules)."""
    import threading
    import time

    class Done:  # a torch.distributed work that has already completed
        def wait(self, timeout: object = None) -> bool:
            return True

    def waiters() -> int:
        return sum(t.name == "pippy-waiter" for t in threading.enumerate())

    before = waiters()
    for _ in range(5):
        waiter = watch.Waiter()
        job = watch.Watched(Done())
        waiter.submit(job, 5.0)
        assert job.result(5.0) is True
        del waiter
    gc.collect()
    deadline = time.monotonic() + 5
    while waiters() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert waiters() == before, f"{waiters() - before} waiter threads outlived their waiters"

"""What a schedule's ranks share outside a step: the facts they must agree on, and the trace gathered on rank 0.

    >>> import torch
    >>> from pippy import Schedule1F1B, pipeline
    >>> from pippy.runtime.localcomm import LocalTransport
    >>> pipe = pipeline(torch.nn.Linear(2, 2), 2, (torch.ones(4, 2),))
    >>> sched = Schedule1F1B(pipe.build_stage(0, "cpu"), 2, transport=LocalTransport.world(1)[0])
    >>> facts = schedule_facts(sched)
    >>> facts["schedule"], facts["n_microbatches"], facts["stage_tensors"]
    ('Schedule1F1B', 2, ['weight .. bias (2 tensors)'])
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist

from pippy.frontend.cudadevice import barrier, on_collective_device
from pippy.runtime.comm import DistTransport
from pippy.runtime.storesync import StoreSync
from pippy.runtime.transport import Transport
from pippy.sim.clocks import make_causal
from pippy.sim.timeline import Event, Timeline

__all__ = ["check_one_group", "gather_trace", "on_one_clock", "schedule_facts", "store_sync", "trace_barrier"]


def schedule_facts(sched: Any) -> dict[str, Any]:
    """Schedule, micro-batches, placement, stage edges and tensors: compared across ranks at the first step.

    See :func:`pippy.runtime.faults.agree`.
    """
    plan = sched._eval_schedule
    pipe = sched.pipe
    order = order_hash(sched.schedule)
    return {
        "schedule": type(sched).__name__,
        "n_microbatches": sched.n_microbatches,
        "ranks": sched.transport.world_size,
        "stage_to_rank": list(plan.stage_to_rank),
        "action order (a hash; set by the class, costs= and a loaded CSV, the same on every rank)": order,
        "stage_edges": [
            [[m.describe() for m in info.input_meta], [m.describe() for m in info.outputs]]
            for info in pipe.stage_infos
        ],
        "stage_tensors": "hand-cut" if getattr(pipe, "manual", False)
        else [_tensor_names(info.module) for info in pipe.stage_infos],
    }


def check_one_group(stages: list[Any]) -> None:
    """Refuse no stages, or this rank's stages built over different process groups (a schedule sends over one).

        >>> check_one_group([])
        Traceback (most recent call last):
        ...
        ValueError: a schedule needs at least one stage
    """
    if not stages:
        raise ValueError("a schedule needs at least one stage")
    world = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    groups = [None if st.group is world else st.group for st in stages]
    if any(g is not groups[0] for g in groups[1:]):
        named = ", ".join(f"stage {st.index}: {'default (WORLD)' if st.group is None else st.group}" for st in stages)
        raise ValueError(
            f"this rank's stages were built over different process groups ({named}); a schedule sends over one. "
            "Expected the same group= in every build_stage (or PipelineStage) call of the pipeline, on every rank"
        )


def trace_barrier(transport: Transport, where: str) -> None:
    """Wait until every rank is here (a common clock origin for the trace); ``where`` names the wait in errors.

    On gloo it waits through the store (:class:`~pippy.runtime.storesync.StoreSync`): it stops when another rank
    posts a failure, or after the transport's timeout. Elsewhere it is a barrier on the group the schedule sends on.
    """
    assert isinstance(transport, DistTransport)
    sync = store_sync(transport)
    if sync is not None:
        sync.barrier(where)
    else:
        barrier(transport.p2p_group)


def order_hash(schedule: Any) -> str:
    """A short hash of every rank's compute actions in order ("forward only" without a training order)."""
    if schedule is None:
        return "forward only"
    order = " ".join(str(a) for acts in schedule.compute_only().actions for a in acts)
    return hashlib.sha1(order.encode()).hexdigest()[:12]


def gather_trace(transport: Transport, rank: int, events: list[Event], name: str,
                 path: str | None, where: str = "", origin: float | None = None) -> Timeline | None:
    """Collect every rank's events on rank 0; there, put them on one clock, build the timeline, write it to ``path``.

    ``origin`` is the ``time.perf_counter()`` value the events count from. Each rank sends it as a
    wall-clock time (shared by the ranks of one host), and rank 0 shifts every rank's events onto
    the earliest origin; when the ranks are on several hosts (whose wall clocks may disagree),
    :func:`pippy.sim.clocks.make_causal` then moves ranks until no receive ends before its send
    starts (not on NCCL, whose host times of receives are not arrivals). Only rank 0 waits (see
    :func:`trace_barrier` for how). Returns the timeline on rank 0, else None.
    """
    now = time.perf_counter()
    wall = time.time() - (now - (now if origin is None else origin))
    payload: Any = (events, wall, _host())
    assert isinstance(transport, DistTransport)
    sync = store_sync(transport)
    world = transport.world_size
    if sync is not None:
        got = sync.gather(payload, where or f"rank {rank}, action trace gather")
        gathered: list[Any] = got if got is not None else []
    else:
        group = transport.p2p_group
        gathered = [None] * world if rank == 0 else []
        with on_collective_device(group):  # NCCL gathers objects on the current CUDA device
            dist.gather_object(payload, gathered if rank == 0 else None, dst=dist.get_global_rank(group, 0), group=group)
    if rank != 0:
        return None
    members = tuple(dist.get_process_group_ranks(transport.group)) if transport.group is not None else ()
    whole = not members or members == tuple(range(dist.get_world_size()))
    if not whole:  # one pipeline of several (data parallel): its own file, its ranks named by their global ranks
        name = f"{name} (pipeline of global ranks {list(members)})" if name else f"global ranks {list(members)}"
    timeline = on_one_clock([(evs, w) for evs, w, _ in gathered], world, name)
    # ranks on other hosts may keep other wall clocks: make every message causal. Not on NCCL, where a RECV's
    # host time ends when its wait is queued on the stream, not when the message is in (no message to check)
    if len({h for _, _, h in gathered}) > 1 and not getattr(transport, "_stream_waits", False):
        timeline = make_causal(timeline)[0]
    if path:
        from pippy.sim.render import write_chrome_trace

        write_chrome_trace(timeline, path if whole else pipeline_trace_path(path, members))
    return timeline


def pipeline_trace_path(path: str, members: tuple[int, ...]) -> str:
    """Where the trace of the pipeline made of global ranks ``members`` goes when the world holds several pipelines.

    Each pipeline's rank 0 writes its own file, so data-parallel replicas do not overwrite each other.

        >>> pipeline_trace_path("out/trace.json", (1, 3))
        'out/trace.ranks1-3.json'
        >>> pipeline_trace_path("trace", (0, 2))
        'trace.ranks0-2'
    """
    root, ext = os.path.splitext(path)
    return f"{root}.ranks{'-'.join(map(str, members))}{ext}"


def _host() -> str:
    """This process's host name (ranks on one host share its wall clock)."""
    return socket.gethostname()


def on_one_clock(gathered: list[tuple[list[Event], float]], world: int, name: str = "") -> Timeline:
    """One timeline from each rank's ``(events, wall-clock origin)``: times from the earliest origin.

        >>> from pippy.schedules.ir import Action
        >>> tl = on_one_clock([([Event(0, Action.parse("0F0"), 0.0, 1.0)], 100.0),
        ...                    ([Event(1, Action.parse("1F0"), 0.0, 1.0)], 101.0)], 2)
        >>> [(e.rank, e.start) for e in tl.events]
        [(0, 0.0), (1, 1.0)]
    """
    base = min((w for _, w in gathered), default=0.0)
    return Timeline.from_events([Event(e.rank, e.action, e.start + w - base, e.end + w - base)
                                 for evs, w in gathered for e in evs], world, name=name)


def store_sync(transport: DistTransport) -> StoreSync | None:
    """The transport's :class:`StoreSync` (made once), or None without a store (NCCL)."""
    sync: StoreSync | None = getattr(transport, "_store_sync", None)
    if sync is None:
        shared = transport.board_store()
        if shared is None:
            return None
        store, prefix, board = shared
        sync = StoreSync(store, prefix, transport.rank, transport.world_size, transport.timeout, board)
        transport._store_sync = sync  # type: ignore[attr-defined]
    return sync


def _tensor_names(module: torch.nn.Module) -> str:
    """A short, comparable summary of which parameters a stage holds: first .. last FQN and the count."""
    names = [n for n, _ in module.named_parameters()]
    return f"{names[0]} .. {names[-1]} ({len(names)} tensors)" if names else "(no parameters)"

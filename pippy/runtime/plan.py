"""The communication plan of one rank for one schedule: edges, tags, who sends what to whom, prefetch points.

Built once per (schedule, rank) and read by the executor at every step. Every value that
crosses ranks travels on an *edge*: output ``j`` of stage ``src`` read as input ``k`` of stage
``dst``. Edges are numbered in one global order (producer stage, then output, then consumer);
both ends post their messages between a pair of ranks in that order, which is what backends
that match messages in posting order (NCCL) need, and tags make them unambiguous elsewhere (gloo).

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> from pippy.schedules.generators import one_f_one_b
    >>> from pippy.schedules.lower import lower
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> pipe = pipeline(net, 2, (torch.ones(2, 2),), split_spec={"0": SplitPoint.END})
    >>> plan = CommPlan(pipe.stage_infos, lower(one_f_one_b(2, 2)), rank=1, ordered=False)
    >>> [(e.src, e.dst, e.peer) for e in plan.recv_f[1]], plan.send_b_stages
    ([(0, 1, 0)], frozenset({1}))
    >>> sched = lower(one_f_one_b(2, 2))
    >>> [str(a) for a in sched.actions[1][:5]], plan.prefetch_at   # 1RECV_F1 is posted as the step starts
    (['1RECV_F0', '1F0', '1B0', '1SEND_B0', '1RECV_F1'], {0: [4]})
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pippy.frontend.split import StageInfo
from pippy.runtime.comm import EDGE_TAGS
from pippy.runtime.postorder import receive_posts
from pippy.runtime.shapes import needs_incoming
from pippy.schedules.ir import Kind, Schedule, stage_comm

RECV_AHEAD = 2
"""Receives kept posted ahead on each channel (a stage's RECV_F or RECV_B) of an unordered transport (gloo).

gloo reads a message that arrived before its receive was posted in the thread that posts the
receive: 1-2.5 ms for the 16-512 KB messages of ``benchmarks/vs_torch_pipelining.py`` on the 2-core
CPU, against 0.03-0.15 ms to post a receive that waits for its message (which gloo's own thread
then reads). Posting two ahead per channel, at the cost of up to two receive buffers each beyond
the one being waited for, took
every receive of those runs ahead of its send. A channel with fewer compute actions between its
receives than that is not held back: each receive is still posted one compute action early.
"""

__all__ = ["CommPlan", "Edge"]


@dataclass(frozen=True, slots=True)
class Edge:
    """Output ``j`` of stage ``src`` read as input ``k`` of stage ``dst``; ``peer`` is the rank at the other end.

        >>> Edge(3, 0, 1, 2, 0, peer=1).tag(backward=True, mb=2, n_microbatches=4)
        240
    """

    id: int
    src: int
    j: int
    dst: int
    k: int
    peer: int

    def tag(self, *, backward: bool, mb: int, n_microbatches: int, phase: int = 0) -> int:
        """The message tag of this edge's activation (or, ``backward``, gradient) for micro-batch ``mb`` in a call of
        ``phase`` (0-7: the schedule's call count mod 2, twice, plus 1 for a training step, plus 4 for an odd
        number among the schedules sharing its group; see :attr:`CommPlan.phase`), so that ranks making different
        calls (one ``eval()`` where another runs ``step()``, one call more, or a step of another pipeline over the
        same ranks) wait and time out instead of taking each other's messages.

        Tag bands between two ranks: edge messages below ``EDGE_TAGS`` (``1 << 28``); their shape
        headers at ``EDGE_TAGS`` + edge tag (:mod:`pippy.runtime.shapes`); tied-gradient sums from
        ``2 * EDGE_TAGS`` (:mod:`pippy.runtime.tied`); generation from ``4 * EDGE_TAGS``
        (:mod:`pippy.runtime.genproto`).
        """
        tag = ((self.id * 2 + int(backward)) * n_microbatches + mb) * 8 + phase
        if tag >= EDGE_TAGS:
            raise ValueError(
                f"edge {self.id} (stage {self.src} -> {self.dst}), micro-batch {mb}: message tag {tag} is past the "
                f"{EDGE_TAGS} the tag space holds ({n_microbatches} micro-batches x 2 x 8 x edges). Expected fewer "
                "micro-batches per step or fewer values crossing stages; use fewer micro-batches"
            )
        return tag


class CommPlan:
    """Rank ``rank``'s messages under ``schedule`` (lowered), for the stages in ``infos``.

    Per local stage ``s``: ``recv_f[s]`` the remote inputs it receives, ``send_f[s]`` the remote
    consumers of its outputs, ``recv_b[s]`` the gradients of its outputs that come back,
    ``send_b[s]`` the gradients of its inputs it returns — each in edge order, the order the
    other end posts them. ``readers[s]`` counts who reads its forward-only outputs (its SEND_F
    once, plus each local consumer stage). ``prefetch_at[i]`` lists the RECV actions posted early,
    at action ``i`` (none on ``ordered`` transports (NCCL), whose ``post_order[i]`` lists instead every
    receive posted there, as (RECV, sending stage), where one global order of the messages puts it:
    :mod:`pippy.runtime.postorder`). On unordered ones (gloo): one compute
    action before their own, or earlier, when the RECV ``RECV_AHEAD`` places before them on the
    same channel (stage and kind) starts waiting, or at the step's start for a channel's first
    ``RECV_AHEAD``; a channel whose values vary in size keeps one compute action early (its
    receives wait for the step's first shape, see :mod:`pippy.runtime.shapes`). ``send_b_stages``
    are the stages that run a SEND_B after their backward. ``grad_flags`` (unordered transports): each
    gradient message goes with a one-byte flag (at ``HEADER_TAG`` + its tag), 0 when the sender's input
    gradient is None (no path from the loss reached it); the receiver then runs no backward from it, so
    parameters only it would reach keep ``.grad is None`` as in the unpipelined model. The zeros still go
    out (their receive is posted ahead). Ordered transports (NCCL) send the zeros alone: reading a flag
    there would cost a host synchronisation per message.
    """

    def __init__(self, infos: Sequence[StageInfo], schedule: Schedule, rank: int, *, ordered: bool) -> None:
        where = schedule.stage_to_rank
        mine = set(schedule.stages_of(rank))
        self.n_microbatches = schedule.n_microbatches
        self.phase = 0  # of the step running now (Edge.tag): set per step by the executor, 0 on ordered transports
        self.grad_flags = not ordered  # see the class docstring
        edges: list[Edge] = []
        for info in infos:
            for j, cons in enumerate(info.consumers):
                for d, k in cons:
                    peer = where[d] if where[info.index] == rank else where[info.index]
                    edges.append(Edge(len(edges), info.index, j, d, k, peer))
        self.recv_f: dict[int, list[Edge]] = {s: [] for s in mine}
        self.send_f: dict[int, list[Edge]] = {s: [] for s in mine}
        self.recv_b: dict[int, list[Edge]] = {s: [] for s in mine}
        self.send_b: dict[int, list[Edge]] = {s: [] for s in mine}
        for e in edges:
            if where[e.src] == where[e.dst]:
                continue  # same rank: handed over directly
            if e.dst in mine:
                self.recv_f[e.dst].append(e)
                if infos[e.dst].input_meta[e.k].requires_grad:
                    self.send_b[e.dst].append(e)
            if e.src in mine:
                if infos[e.src].outputs[e.j].is_tensor or infos[e.src].outputs[e.j].varies:
                    self.send_f[e.src].append(e)
                if infos[e.src].outputs[e.j].requires_grad:
                    self.recv_b[e.src].append(e)
        self.readers = {
            s: int(any(where[d] != rank for d in infos[s].consumer_stages))
            + sum(1 for d in infos[s].consumer_stages if where[d] == rank)
            for s in mine
        }
        comm = stage_comm(schedule)
        self.send_b_stages = frozenset(s for s in mine if Kind.SEND_B in comm[s])
        self.prefetch_at: dict[int, list[int]] = {}
        # ordered: every receive is posted where the one global order of messages puts it
        self.post_order = receive_posts(self, infos, schedule, rank) if ordered else {}
        last_compute = -1
        channel: dict[tuple[int, Kind], list[int]] = {}  # per (stage, RECV kind): its RECV actions so far
        for idx, act in enumerate([] if ordered else schedule.actions[rank]):
            if act.kind.is_compute:
                last_compute = idx
            elif act.kind in (Kind.RECV_F, Kind.RECV_B):
                seen = channel.setdefault((act.stage, act.kind), [])
                if last_compute >= 0:  # one compute action early, or while the channel's RECV_AHEAD-th last waits
                    at = last_compute
                    if not self._varies(infos, act.stage, act.kind):  # else wait for the step's first shape
                        at = min(at, seen[-RECV_AHEAD] if len(seen) >= RECV_AHEAD else 0)
                    self.prefetch_at.setdefault(at, []).append(idx)
                seen.append(idx)

    def _varies(self, infos: Sequence[StageInfo], s: int, kind: Kind) -> bool:
        """Whether a value of stage ``s``'s RECV_F / RECV_B channel varies in size (it goes with a shape header)."""
        if kind is Kind.RECV_F:
            return any(needs_incoming(infos[s].input_meta[e.k]) for e in self.recv_f[s])
        return any(bool(infos[s].outputs[e.j].dynamic) for e in self.recv_b[s])


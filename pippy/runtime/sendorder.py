"""On transports that match in posting order (NCCL): post each send to a peer in the order that peer posts its receives.

NCCL pairs the k-th send from rank a to rank b with the k-th receive b posts from a, whatever
the tags. Receives go out in one global order of the messages (:mod:`pippy.runtime.postorder`),
which is also the order their senders run their SENDs in, so the two orders agree: in ZB-V for
p = 2, rank 1 takes the third forward before stage 3's first gradient, as rank 0 sends them.
:class:`SendOrder` still holds any send whose peer posts other messages from this rank before it
(only a schedule that order cannot be taken from, which the executor would refuse anyway, could
need that): a send feeds nothing on its own rank, so it may go out later than its action, and a
send still held at the end of the step says the ranks run different schedules.

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> from pippy.runtime.localcomm import LocalTransport
    >>> from pippy.schedules.lower import lower
    >>> from pippy.schedules.zero_bubble import zbv
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(4)])
    >>> pipe = pipeline(net, 4, (torch.ones(4, 2),), split_spec={str(i): SplitPoint.END for i in range(3)})
    >>> order = SendOrder(LocalTransport.world(2)[0], pipe.stage_infos, lower(zbv(2, 4)))
    >>> order.expected[1][:4]   # rank 1 takes 3 forwards (tags 0, 8, 16), then stage 3's first gradient (160)
    [0, 8, 16, 160]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from pippy.frontend.split import StageInfo
from pippy.runtime.plan import CommPlan
from pippy.runtime.shapes import HEADER_TAG, needs_incoming
from pippy.runtime.stage import StageError
from pippy.runtime.transport import Transport, WaitContext
from pippy.schedules.ir import Kind, Schedule

__all__ = ["SendOrder"]


class _Held:
    """A send not posted yet: ``handle`` is set once it is."""

    __slots__ = ("handle",)

    def __init__(self) -> None:
        self.handle: Any = None


class SendOrder:
    """Sends through ``transport`` in each peer's receive order (see the module); the executor's sending transport."""

    def __init__(self, transport: Transport, infos: Sequence[StageInfo], schedule: Schedule) -> None:
        self.transport = transport
        self.rank = transport.rank
        self.expected: dict[int, list[int]] = {}  # peer -> the tags it receives from this rank, in its order
        for peer in range(schedule.num_ranks):
            if peer != self.rank:
                self.expected[peer] = _receive_order(infos, schedule, peer, self.rank)
        self._known = {p: set(tags) for p, tags in self.expected.items()}
        self.start_step()

    def start_step(self) -> None:
        """Every peer's order starts over (and nothing is held)."""
        self._next = dict.fromkeys(self.expected, 0)
        self._held: dict[int, dict[int, tuple[torch.Tensor, WaitContext | None, _Held]]] = {p: {} for p in self.expected}

    def isend(self, tensor: torch.Tensor, peer: int, tag: int, ctx: WaitContext | None = None) -> Any:
        """Post ``tensor`` now, or hold it until the peer's earlier receives have their messages posted."""
        if tag not in self._known.get(peer, ()):  # not an edge message of the step: not ordered here
            return self.transport.isend(tensor, peer, tag, ctx)
        held = _Held()
        self._held[peer][tag] = (tensor, ctx, held)
        order, pending = self.expected[peer], self._held[peer]
        while self._next[peer] < len(order) and order[self._next[peer]] in pending:
            t, c, h = pending.pop(order[self._next[peer]])
            h.handle = self.transport.isend(t, peer, order[self._next[peer]], c)
            self._next[peer] += 1
        return held

    def done(self, handle: Any) -> bool:
        """Whether the send was posted and has completed."""
        if isinstance(handle, _Held):
            return handle.handle is not None and self.transport.done(handle.handle)
        return self.transport.done(handle)

    def wait(self, handle: Any, ctx: WaitContext) -> Iterator[None]:
        """Wait for a posted send; one still held at the end of the step means the ranks' orders disagree."""
        if isinstance(handle, _Held):
            if handle.handle is None:
                held = {p: sorted(h) for p, h in self._held.items() if h}
                raise StageError(
                    f"{ctx.describe()}: this send is still held at the end of the step: the peer's receive order "
                    f"expects other messages from this rank first (held tags per peer: {held}). The ranks run "
                    "different schedules; build the schedule the same way on every rank"
                )
            handle = handle.handle
        yield from self.transport.wait(handle, ctx)


def _receive_order(infos: Sequence[StageInfo], schedule: Schedule, rank: int, sender: int) -> list[int]:
    """The tags ``rank`` posts receives for from ``sender`` in one step, in posting order (its RECV actions' parts
    where the plan posts them; per part its edges in edge order, a varying tensor's shape header before the tensor)."""
    plan = CommPlan(infos, schedule, rank, ordered=True)
    m = schedule.n_microbatches
    out: list[int] = []
    acts = schedule.actions[rank]
    for j, end in [group for i in sorted(plan.post_order) for group in plan.post_order[i]]:  # where the plan posts
        a = acts[j]
        if a.kind is Kind.RECV_F:
            for e in plan.recv_f[a.stage]:
                meta = infos[a.stage].input_meta[e.k]
                if e.src != end or e.peer != sender or (not meta.is_tensor and not meta.varies):
                    continue  # another sender's, or a constant that is never sent
                tag = e.tag(backward=False, mb=a.mb, n_microbatches=m)
                if needs_incoming(meta) and meta.is_tensor and meta.dynamic:
                    out.append(HEADER_TAG + tag)
                out.append(tag)
        else:
            out.extend(e.tag(backward=True, mb=a.mb, n_microbatches=m) for e in plan.recv_b[a.stage]
                       if e.dst == end and e.peer == sender)
    return out

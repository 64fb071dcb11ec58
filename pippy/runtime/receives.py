"""The receives of one RECV_F / RECV_B action: posted in edge order (early, when prefetched), then completed.

Each posted receive is a :class:`Posted`: a handle and its buffer, a constant that is never sent,
an :class:`~pippy.runtime.shapes.Incoming` value (its size varies: a shape header first), or a
gradient receive kept to be posted at its wait (its shape is the micro-batch's output shape, not
known while that forward has not run).

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> from pippy.runtime.localcomm import LocalTransport
    >>> from pippy.runtime.plan import CommPlan
    >>> from pippy.runtime.stage import Stage
    >>> from pippy.schedules.generators import one_f_one_b
    >>> from pippy.schedules.ir import Action, Kind
    >>> from pippy.schedules.lower import lower
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> pipe = pipeline(net, 2, (torch.ones(2, 2),), split_spec={"0": SplitPoint.END})
    >>> ends = LocalTransport.world(2)
    >>> rx = Receives(ends[1], CommPlan(pipe.stage_infos, lower(one_f_one_b(2, 2)), 1, ordered=False),
    ...               pipe.stage_infos, {1: Stage(pipe, 1)})
    >>> posted = rx.post(Action(1, Kind.RECV_F, 0))
    >>> _ = ends[0].isend(torch.ones(1, 2), peer=1, tag=0)
    >>> for _ in rx.complete(posted, {}): pass
    >>> posted[0].value
    tensor([[1., 1.]])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from pippy.frontend.split import StageInfo, ValueMeta
from pippy.runtime.plan import CommPlan, Edge
from pippy.runtime.shapes import HEADER_TAG, Incoming, needs_incoming
from pippy.runtime.stage import PipeliningShapeError, Stage
from pippy.runtime.transport import Transport, WaitContext
from pippy.schedules.ir import Action, Kind

__all__ = ["Posted", "Receives", "action_ctx"]


def action_ctx(rank: int, a: Action, peer: int, what: str) -> WaitContext:
    """The context of a wait (or a send) of action ``a`` on ``rank`` with ``peer``: what an error names.

        >>> action_ctx(1, Action(1, Kind.RECV_F, 0), 0, "input 0").describe()
        'rank 1, stage 1, action 1RECV_F0 (micro-batch 0), peer rank 0: input 0'
    """
    return WaitContext(rank, a.stage, a.kind.value, a.mb, peer, what)


@dataclass(slots=True)
class Posted:
    """One receive of an action: its handle (None when it posts later or is a constant), context, slot, value."""

    handle: Any
    ctx: WaitContext
    slot: int  # the stage input (RECV_F) or output (RECV_B) it fills
    value: Any
    flag: tuple[Any, torch.Tensor] | None = None  # a gradient's flag receive and buffer (CommPlan.grad_flags)
    none: bool = False  # after completion: the flag said the peer had no gradient (``value`` holds zeros)

    def handles(self) -> list[Any]:
        """The handles already posted (for polling whether the message is in)."""
        own = [] if self.flag is None else [self.flag[0]]
        if isinstance(self.value, Incoming):
            return own + self.value.handles()
        return own + ([] if self.handle is None else [self.handle])


class Receives:
    """Posts and completes the receives of this rank's RECV actions (see the module)."""

    def __init__(self, transport: Transport, plan: CommPlan, infos: Sequence[StageInfo], stages: Mapping[int, Stage]
                 ) -> None:
        self.transport, self.plan, self.infos, self.stages = transport, plan, infos, stages
        # shapes this step's varying values came with: ("in", stage, input) / ("out", stage, output); a step's
        # micro-batches share them, so later receives are posted whole at once (see pippy.runtime.shapes)
        self.known: dict[tuple[str, int, int], tuple[int, ...]] = {}

    def start_step(self) -> None:
        """Forget the shapes of the last step (the next may have other sizes)."""
        self.known = {}

    def post(self, a: Action, end: int | None = None) -> list[Posted]:
        """Post the receives of RECV_F / RECV_B ``a``, in edge order (the order the peer sends them); with ``end``,
        only those whose other end is that stage (a RECV fed by two ranks is posted in parts on NCCL)."""
        s, i, m = a.stage, a.mb, self.plan.n_microbatches
        info, dev = self.infos[s], self.stages[s].device
        out: list[Posted] = []
        if a.kind is Kind.RECV_F:
            # an ordered transport (NCCL) gets every receive of the action in edge order, once one size varies
            lazy = self.transport.ordered and any(needs_incoming(info.input_meta[e.k]) for e in self.plan.recv_f[s])
            for e in self.plan.recv_f[s]:
                meta = info.input_meta[e.k]
                if end is not None and e.src != end and (meta.is_tensor or meta.varies):
                    continue  # another part's (a constant, never sent, comes with every part)
                ctx = self._ctx(a, e.peer, f"input {e.k} ({info.input_names[e.k]}) from stage {e.src}")
                if not meta.is_tensor and not meta.varies:
                    out.append(Posted(None, ctx, e.k, meta.const))
                elif lazy or needs_incoming(meta):
                    tag = e.tag(backward=False, mb=i, n_microbatches=m, phase=self.plan.phase)
                    inc = Incoming(self.transport, meta, e.peer, tag, ctx, dev, post=not lazy,
                                   expect=self.known.get(("in", s, e.k)))
                    out.append(Posted(None, ctx, e.k, inc))
                else:
                    out.append(self._irecv(e, meta, False, i, dev, ctx, e.k))
        else:
            for e in self.plan.recv_b[s]:
                if end is not None and e.dst != end:
                    continue
                ctx = self._ctx(a, e.peer, f"grad of output {e.j} from stage {e.dst}")
                meta = self.infos[s].outputs[e.j]
                flag = self._irecv_flag(e, i, dev, ctx) if self.plan.grad_flags else None
                if meta.dynamic and not self.stages[s].held_outputs(i) and (meta.per_mb or ("out", s, e.j) not in self.known):
                    # prefetched before its F, and no earlier micro-batch of this step told the shape
                    out.append(Posted(None, ctx, e.j, partial(self._irecv_grad, e, i, dev, ctx), flag))  # posts at its wait
                else:
                    out.append(replace(self._irecv_grad(e, i, dev, ctx), flag=flag))
        return out

    def open(self, posted: list[Posted]) -> Iterator[None]:
        """Post every receive of ``posted`` now, in edge order: a varying value's tensor after its header came (a
        generator: that wait yields). For ordered transports, whose receives go out where the order of messages
        puts them (:mod:`pippy.runtime.postorder`), not inside their waits."""
        for p in posted:
            if isinstance(p.value, Incoming):
                yield from p.value.open()
            elif isinstance(p.value, partial):  # a gradient receive whose shape is known by now
                late = p.value()
                p.handle, p.value = late.handle, late.value

    def complete(self, posted: list[Posted], shapes: dict[int, tuple[int, ...]]) -> Iterator[None]:
        """Wait for every receive of ``posted``; each ``value`` is then the tensor (or number) received.

        ``shapes`` gets, per slot, the shape a varying input arrived with.
        """
        for p in posted:
            if isinstance(p.value, Incoming):
                yield from p.value.wait()
                if p.value.shape is not None:
                    shapes[p.slot] = p.value.shape
                    self.known[("in", p.ctx.stage, p.slot)] = p.value.shape
                p.value = p.value.value
            elif isinstance(p.value, partial):  # a gradient receive posted only now (see post)
                late = p.value()
                yield from self.transport.wait(late.handle, p.ctx)
                p.value = late.value
            elif p.handle is not None:
                yield from self.transport.wait(p.handle, p.ctx)
            if p.flag is not None:
                yield from self.transport.wait(p.flag[0], p.ctx)
                p.none = not p.flag[1].numpy()[0]  # a host tensor: read without a device sync or an aten op

    def _irecv_grad(self, e: Edge, i: int, dev: torch.device, ctx: WaitContext) -> Posted:
        """The receive of output ``e.j``'s gradient: shaped like this micro-batch's output when that varies."""
        meta = self.infos[e.src].outputs[e.j]
        if meta.dynamic:
            held = self.stages[e.src].held_outputs(i)
            shape = tuple(self.stages[e.src].output(i, e.j).shape) if held else self.known[("out", e.src, e.j)]
            meta = replace(meta, shape=shape)
        return self._irecv(e, meta, True, i, dev, ctx, e.j)

    def _irecv_flag(self, e: Edge, i: int, dev: torch.device, ctx: WaitContext) -> tuple[Any, torch.Tensor]:
        """The receive of the flag saying whether output ``e.j``'s gradient exists (see ``CommPlan.grad_flags``)."""
        buf = torch.empty(1, dtype=torch.uint8)  # on the host whatever the stage's device (gloo sends either)
        tag = e.tag(backward=True, mb=i, n_microbatches=self.plan.n_microbatches, phase=self.plan.phase)
        return self.transport.irecv(buf, e.peer, HEADER_TAG + tag, ctx), buf

    def note_output(self, where: str, stage: int, j: int, meta: ValueMeta, shape: tuple[int, ...]) -> None:
        """Output ``j`` of ``stage`` came out with ``shape``: a varying one must match this step's others (see module).

        ``where`` names the rank, stage, micro-batch and action for the error.
        """
        if not meta.dynamic or meta.per_mb:
            return
        first = self.known.setdefault(("out", stage, j), shape)
        if first != shape:
            raise PipeliningShapeError(
                f"{where}: output {j} has shape {list(shape)}, but an earlier micro-batch of this step gave "
                f"{list(first)} (shape mismatch); the micro-batches of one step must have equal shapes (their receivers post buffers "
                "of that shape). Split the batch into equal micro-batches, or keep sizes that vary between them out "
                "of the values that cross stages"
            )

    def _irecv(self, e: Edge, meta: ValueMeta, backward: bool, i: int, dev: torch.device, ctx: WaitContext,
               slot: int) -> Posted:
        buf = torch.empty(meta.shape or (), dtype=meta.dtype, device=dev)
        tag = e.tag(backward=backward, mb=i, n_microbatches=self.plan.n_microbatches, phase=self.plan.phase)
        return Posted(self.transport.irecv(buf, e.peer, tag, ctx), ctx, slot, buf)

    def _ctx(self, a: Action, peer: int, what: str) -> WaitContext:
        return action_ctx(self.transport.rank, a, peer, what)

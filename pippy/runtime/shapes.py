"""Messages whose size varies (a pipe traced with ``dynamic_shapes``): a shape header, then the tensor.

A stage input whose traced shape has dynamic dimensions is received in two parts: a small int64
header with the actual shape, then the tensor, into a buffer of that shape. The micro-batches of
one step have equal shapes (the batch splits into equal parts, and sizes that depend on the data
are marked ``per_mb``), so once one header of a step is in, a receiver passes its shape as
``expect``: the tensor's receive is posted at once, beside the header's, and the header only
checks it. The sender refuses, before sending, a micro-batch whose shape differs from its step's
first (:meth:`pippy.runtime.receives.Receives.note_output`), so a posted buffer never meets a
tensor of another size; the step fails there instead (on NCCL, which has no failure board, the
receiver then waits out its timeout). A size that crosses
stages as a plain number (a SymInt the consumer cannot read off a tensor) travels as a
one-element tensor. Static edges never send a header: a static pipe pays nothing.

    >>> from pippy.frontend.split import ValueMeta
    >>> from pippy.runtime.transport import WaitContext
    >>> from pippy.runtime.localcomm import LocalTransport
    >>> t = LocalTransport.world(2)
    >>> meta = ValueMeta((2, 8), torch.float32, dynamic=(1,))
    >>> _ = send_value(t[0], torch.ones(2, 5), meta, peer=1, tag=3)
    >>> inc = Incoming(t[1], meta, peer=0, tag=3, ctx=WaitContext(1, 1, "RECV_F", 0, 0), device=torch.device("cpu"))
    >>> for _ in inc.wait(): pass
    >>> inc.value.shape
    torch.Size([2, 5])
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from pippy.frontend.split import ValueMeta
from pippy.runtime.comm import EDGE_TAGS
from pippy.runtime.stage import PipeliningShapeError
from pippy.runtime.transport import Transport, WaitContext
from pippy.schedules.ir import Action

__all__ = ["HEADER_TAG", "Incoming", "check_output", "needs_incoming", "send_value"]

HEADER_TAG = EDGE_TAGS  # added to an edge's tag for its shape header: above edge tags, below tied-grad tags


def needs_incoming(meta: ValueMeta) -> bool:
    """True when a forward edge's value is received through :class:`Incoming` (its size varies).

        >>> needs_incoming(ValueMeta((2,), torch.float32)), needs_incoming(ValueMeta(None, None, const=3, varies=True))
        (False, True)
    """
    return meta.varies or (meta.is_tensor and bool(meta.dynamic))


def _scalar_dtype(meta: ValueMeta) -> torch.dtype:
    return torch.float64 if isinstance(meta.const, float) else torch.int64


def check_output(rank: int, a: Action, t: torch.Tensor, meta: ValueMeta, what: str, hand_cut: bool = False) -> None:
    """Raise ``PipeliningShapeError`` unless a stage's output ``t`` (of action ``a``) fits the traced ``meta`` (for a
    ``hand_cut`` stage: the shapes its first step, or ``output_args``, fixed).

        >>> from pippy.schedules.ir import Action
        >>> check_output(0, Action.parse("0F1"), torch.ones(2, 8), ValueMeta((2, 8), torch.float32), "output 0")
        >>> check_output(0, Action.parse("0F1"), torch.ones(2, 8).bfloat16(), ValueMeta((2, 8), torch.float32), "output 0")
        Traceback (most recent call last):
        ...
        pippy.runtime.stage.PipeliningShapeError: rank 0, stage 0, action 0F1 (micro-batch 1): dtype mismatch: output 0 ...
    """
    shape_ok = meta.fits(tuple(t.shape))
    if t.dtype == meta.dtype and shape_ok:
        return
    kind = " and ".join(f"{k} mismatch" for k, bad in (("shape", not shape_ok), ("dtype", t.dtype != meta.dtype)) if bad)
    where = f"rank {rank}, stage {a.stage}, action {a} (micro-batch {a.mb}): {kind}: {what} is {t.dtype}{list(t.shape)}"
    if hand_cut:
        raise PipeliningShapeError(
            f"{where} but the stage's messages were built for {meta.describe()} (fixed at its first step, or by "
            "output_args). Return the same shapes and dtypes every step (no size that depends on the data), or build "
            "new stages and a new schedule for the new form"
        )
    fixed = ("Dtypes and the dimensions not marked '?' are fixed at trace time" if meta.dynamic else
             "Shapes and dtypes are fixed at trace time: use the traced micro-batch size (or trace with "
             "dynamic_shapes)")
    raise PipeliningShapeError(
        f"{where} but the traced pipe expects {meta.describe()}. {fixed}; keep the stage's computation as traced (no "
        "dtype or shape that depends on the data)"
    )


def send_value(transport: Transport, value: Any, meta: ValueMeta, peer: int, tag: int,
               ctx: WaitContext | None = None, device: torch.device | None = None) -> list[Any]:
    """Post the message(s) of one forward edge; returns their handles (to wait for before the step ends).

    ``device`` (the stage's) is where a number is put to be sent.
    """
    if meta.varies:
        return [transport.isend(torch.tensor([value], dtype=_scalar_dtype(meta), device=device), peer, tag, ctx)]
    t = value.detach().contiguous()
    handles = []
    if meta.dynamic:
        header = torch.tensor(t.shape, dtype=torch.int64, device=t.device)
        handles.append(transport.isend(header, peer, HEADER_TAG + tag, ctx))
    handles.append(transport.isend(t, peer, tag, ctx))
    return handles


class Incoming:
    """One value arriving on a forward edge whose size varies: posts its header (or scalar) when made.

    ``wait()`` (a generator, like the transport's waits) waits for the header, posts the receive of
    the tensor into a buffer of the announced shape and waits for it; ``value`` is then the tensor
    (or the number). On a transport that matches in posting order (``ordered``), pass ``post=False``
    and the receives are posted inside ``wait()``, in edge order; a static tensor is then received
    this way too (no header).
    """

    def __init__(self, transport: Transport, meta: ValueMeta, peer: int, tag: int, ctx: WaitContext,
                 device: torch.device, *, post: bool = True, expect: tuple[int, ...] | None = None) -> None:
        self.transport, self.meta, self.peer, self.tag, self.ctx, self.device = transport, meta, peer, tag, ctx, device
        self.expect = expect if meta.is_tensor and meta.dynamic and not meta.per_mb else None
        self.payload: Any = None  # the tensor's receive, when posted beside the header (``expect``) or after it
        self.header_in = False  # the header (or the whole value when it has none) was waited for
        if meta.varies:
            self.first = torch.empty(1, dtype=_scalar_dtype(meta), device=device)
        elif meta.dynamic:
            self.first = torch.empty(len(meta.shape or ()), dtype=torch.int64, device=device)
        else:  # a static tensor, received lazily (in order) on an ordered transport
            self.first = torch.empty(meta.shape or (), dtype=meta.dtype, device=device)
        self.value: Any = None
        self.shape: tuple[int, ...] | None = None
        self.handle: Any = self._post_first() if post else None

    def _post_first(self) -> Any:
        tag = HEADER_TAG + self.tag if self.meta.is_tensor and self.meta.dynamic else self.tag
        handle = self.transport.irecv(self.first, self.peer, tag, self.ctx)
        if self.expect is not None:  # the shape is known: the tensor's receive goes out now too
            self.value = torch.empty(self.expect, dtype=self.meta.dtype, device=self.device)
            self.payload = self.transport.irecv(self.value, self.peer, self.tag, self.ctx)
        return handle

    def handles(self) -> list[Any]:
        """The receives already posted (to poll whether the message is in)."""
        return [h for h in (self.handle, self.payload) if h is not None]

    def open(self) -> Iterator[None]:
        """Post the receives; for a tensor whose size varies, also wait for its header and post the tensor's receive
        (a generator, like :meth:`wait`). On an ordered transport this keeps both in the order they were opened."""
        if self.handle is None:
            self.handle = self._post_first()
        if self.payload is None and self.meta.is_tensor and self.meta.dynamic:
            yield from self.transport.wait(self.handle, self.ctx, host=True)  # the header is read on the host
            self.header_in = True
            self.value = torch.empty(self._announced(), dtype=self.meta.dtype, device=self.device)
            self.payload = self.transport.irecv(self.value, self.peer, self.tag, self.ctx)

    def wait(self) -> Iterator[None]:
        """Wait for the whole value (header first); sets ``value`` and, for a tensor, ``shape``."""
        yield from self.open()
        if not self.header_in:  # a header or a number, read on the host (a static tensor only on the device)
            yield from self.transport.wait(self.handle, self.ctx, host=bool(self.meta.varies or self.meta.dynamic))
        if self.meta.varies:
            x = self.first.item()
            self.value = int(x) if self.first.dtype == torch.int64 else float(x)
            return
        if not self.meta.dynamic:
            self.value = self.first
            return
        shape = self._announced()
        if self.expect is not None and shape != self.expect:  # the sender refuses this before sending
            raise PipeliningShapeError(
                f"{self.ctx.describe()}: rank {self.peer} announced shape {list(shape)}, but an earlier micro-batch "
                f"of this step came with {list(self.expect)} (shape mismatch); the micro-batches of one step must have equal "
                "shapes. Split the batch into equal micro-batches"
            )
        yield from self.transport.wait(self.payload, self.ctx)

    def _announced(self) -> tuple[int, ...]:
        """The shape the header announced (read once), checked against the traced pipe's."""
        if self.shape is not None:
            return self.shape
        shape = tuple(int(d) for d in self.first.tolist())
        if not self.meta.fits(shape):
            raise PipeliningShapeError(
                f"{self.ctx.describe()}: rank {self.peer} announced shape {list(shape)}, but the traced pipe expects "
                f"{self.meta.describe()} ('?' varies; shape mismatch). The two ranks run different pipes: trace both from the same "
                "model, example and dynamic_shapes"
            )
        self.shape = shape
        return shape

"""The generation ring: what each rank sends, receives and computes, group by group, token step by token step.

Every rank runs :func:`run_rank`, a generator (it yields while an in-process receive waits, and
never yields over torch.distributed, whose waits block with a timeout). The batch is cut into
``groups`` equal groups; a message is one (group, token step) event::

    stage 0       prefill g0, g1, ...; then per token message from the last stage: embed it, run, send on
    stage s>0     receive [hdr] + hidden [b, l, H] from stage s-1, run its layers, send on
    last stage    logits -> next tokens (pad for finished rows), then [g, t, done, tokens] back to stage 0
    the end       stage 0 sends STOP down the line once every group is done; the last stage sends the
                  output [B, prompt + new] to every other rank

A group is done when all its rows met an EOS or ``max_new_tokens`` were made; only the last stage
decides it and the verdict travels in-band, so no rank needs to guess. Each rank keeps, per group,
the KV cache of its own layers, the attention mask and the position ids (computed alike on every
rank from the prompt's mask, as ``model.generate`` computes them); only hidden states and token ids
travel. With ``groups >= stages`` every stage has a group to work on in steady state.

Every rank posts its messages in one global order, as NCCL needs (it runs a rank's messages on one
stream in posting order, and a large send finishes only when its receive runs): the stages after
the first relay in arrival order, and stage 0 posts each token receive early enough for that order
(:class:`_TokenReceives`). The in-process transport checks this when it is ordered.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pippy.runtime.comm import EDGE_TAGS, PipeCommError
from pippy.runtime.genpick import Picker
from pippy.runtime.genstage import GenerationStage
from pippy.runtime.transport import Transport, WaitContext

# nothing public: Request and run_rank are pippy.generate's own (pippy.runtime.generate, which has the examples)
__all__: list[str] = []

_STOP, _DATA = 0, 1
_GEN = 4 * EDGE_TAGS  # generation's tag band (see pippy.runtime.plan: edges, shape headers and tied grads sit below)
_TAG_HDR, _TAG_ACT, _TAG_TOK, _TAG_OUT, _TAG_OUT_HDR = (_GEN + k for k in range(1, 6))


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One generate call as every rank sees it (same inputs on every rank give the same Request)."""

    input_ids: torch.Tensor
    """Prompts ``[B, L]`` (left-padded), on the stage's device."""
    mask: torch.Tensor | None
    """Attention mask ``[B, L]``; ``None`` when no row is padded (``model.generate`` then drops it too)."""
    positions: torch.Tensor
    """Position ids ``[B, L]``: ``cumsum(mask) - 1``, 0 on padding."""
    groups: int
    """Number of equal groups the batch is cut into."""
    in_flight: int
    """Groups in the ring at once (``groups``: all; 1: one after another, no stage overlaps another)."""
    max_new_tokens: int
    """New tokens per row at most."""
    eos: torch.Tensor
    """EOS ids (int64; empty: no early stop)."""
    pad_token_id: int
    """Token for finished rows and for padding the shorter groups' output."""
    picker: Picker
    """Greedy or sampling choice of the next token (last stage only)."""
    progress: int
    """Print a progress line every this many new tokens (last stage, stderr); 0: quiet."""

    @property
    def rows(self) -> int:
        """Rows per group."""
        return self.input_ids.shape[0] // self.groups


@dataclass(frozen=True, slots=True)
class _Wait(WaitContext):
    """A wait of the generation ring: names rank, stage, group, token step and peer (in ``what``)."""

    def describe(self) -> str:
        """One line naming rank, stage, what is awaited (group, token step) and the peer."""
        return f"rank {self.rank}, stage {self.stage}, peer rank {self.peer}: {self.what}"


class _Link:
    """This rank's bounded messages: sends kept until done (a failed one raises), receives waited for."""

    def __init__(self, transport: Transport, stage: GenerationStage) -> None:
        self.t, self.stage = transport, stage
        self.rank = transport.rank
        self.pending: deque[tuple[Any, torch.Tensor, WaitContext]] = deque()

    def ctx(self, action: str, group: int, peer: int, what: str) -> WaitContext:
        tail = " (pippy.generate must run on every rank of the pipeline, with the same inputs)"
        return _Wait(self.rank, self.stage.index, action, group, peer, what + tail)

    def send(self, tensor: torch.Tensor, peer: int, tag: int, ctx: WaitContext) -> Iterator[None]:
        self.pending.append((self.t.isend(tensor, peer, tag, ctx), tensor, ctx))
        while len(self.pending) > 1 and self.t.done(self.pending[0][0]):
            handle, _, done_ctx = self.pending.popleft()
            yield from self.t.wait(handle, done_ctx)  # returns at once; raises if that send failed

    def recv(self, buf: torch.Tensor, peer: int, tag: int, ctx: WaitContext, host: bool = False
             ) -> Generator[None, None, torch.Tensor]:
        yield from self.t.wait(self.t.irecv(buf, peer, tag, ctx), ctx, host=host)
        return buf

    def flush(self) -> Iterator[None]:
        while self.pending:
            handle, _, ctx = self.pending.popleft()
            yield from self.t.wait(handle, ctx)


class _Group:
    """One group's state on one stage: KV cache, attention mask and positions, and the next token step."""

    __slots__ = ("cache", "mask", "pos", "step")

    def __init__(self, cache: Any, mask: torch.Tensor | None, pos: torch.Tensor) -> None:
        self.cache, self.mask, self.pos, self.step = cache, mask, pos, 0


class _Collector:
    """The last stage's record: tokens per group, unfinished rows, the random stream's place, progress lines."""

    def __init__(self, req: Request, stage: GenerationStage) -> None:
        self.req, self.stage = req, stage
        self.tokens: list[list[torch.Tensor]] = [[] for _ in range(req.groups)]
        self.unfinished = [torch.ones(req.rows, dtype=torch.bool, device=stage.device) for _ in range(req.groups)]
        self.finished = [False] * req.groups
        self.cursor = (0, 0)  # next (token step, group) whose draw model.generate would make
        self.next_report = req.progress
        self.start = time.perf_counter()
        self.live: list[torch.Tensor] = []  # rows still generating at each pick (a progress line's rate counts only those)
        where = f"global rank {dist.get_rank()}, " if dist.is_available() and dist.is_initialized() else ""
        self.label = f"pippy.generate [{where}stage {stage.index}, the last]"

    def record(self, g: int, t: int, logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Next tokens ``[rows]`` of group ``g`` at step ``t``, and whether the group is done."""
        req = self.req
        while self.cursor < (t, g):  # model.generate still samples finished rows; use up the same draws
            ct, cg = self.cursor
            if self.finished[cg]:
                req.picker.skip(req.rows, logits.shape[-1], logits.device)
            self.cursor = (ct + 1, 0) if cg + 1 == req.groups else (ct, cg + 1)
        tok = req.picker.pick(logits)
        self.cursor = (t + 1, 0) if g + 1 == req.groups else (t, g + 1)
        unf = self.unfinished[g]
        if req.progress:
            self.live.append(unf.sum())
        if req.eos.numel():
            tok = torch.where(unf, tok, torch.full_like(tok, req.pad_token_id))
            unf &= ~torch.isin(tok, req.eos)
        self.tokens[g].append(tok)
        done = not bool(unf.any()) or len(self.tokens[g]) == req.max_new_tokens
        self.finished[g] = done
        self._report()
        return tok, done

    def _report(self) -> None:
        req = self.req
        if not req.progress:
            return
        low = min(req.max_new_tokens if f else len(ts) for f, ts in zip(self.finished, self.tokens))
        if low < self.next_report and not all(self.finished):
            return
        while self.next_report <= low:
            self.next_report += req.progress
        made = int(torch.stack(self.live).sum()) if self.live else 0  # padding after a row's EOS left out
        secs = max(time.perf_counter() - self.start, 1e-9)
        print(
            f"{self.label}: {low}/{req.max_new_tokens} new tokens per row, "
            f"{sum(self.finished)}/{req.groups} groups done, {made} tokens in {secs:.1f}s ({made / secs:.1f} tokens/s)",
            file=sys.stderr, flush=True,
        )

    def result(self) -> torch.Tensor:
        """``[B, L + n]``: the prompts and the new tokens, groups that stopped early padded with the pad id."""
        req = self.req
        n = max(len(ts) for ts in self.tokens)
        parts = []
        for ts in self.tokens:
            new = torch.stack(ts, dim=1)  # [rows, steps]
            if new.shape[1] < n:
                new = torch.cat([new, new.new_full((req.rows, n - new.shape[1]), req.pad_token_id)], dim=1)
            parts.append(new)
        return torch.cat([req.input_ids, torch.cat(parts, dim=0)], dim=1)


def _compute(stage: GenerationStage, st: _Group, g: int, t: int, x: torch.Tensor) -> torch.Tensor:
    if t != st.step:
        raise PipeCommError(
            f"rank {stage.index}, stage {stage.index}: pipelined generation got group {g} token step {t}, expected "
            f"step {st.step}. The ranks disagree on the messages; run the same pippy version and inputs on every rank."
        )
    if t > 0:  # one new token per row: the mask grows by a column of ones, positions move on by one
        if st.mask is not None:
            st.mask = torch.cat([st.mask, st.mask.new_ones((st.mask.shape[0], 1))], dim=1)
        st.pos = st.pos[:, -1:] + 1
    st.step += 1
    with torch.no_grad():
        return stage.module(x, st.mask, st.pos, st.cache)


class _TokenReceives:
    """Stage 0's receives of the last stage's token messages, one per item (group, token step) in the ring, in order.

    Every stage after the first relays in arrival order: it receives item i, sends it on, then
    receives item i + 1. Round the ring of n stages, the last stage sends item i's tokens before it
    receives item i + 1, stage n - 2 sends item i + 1 before it receives item i + 2, ..., stage 1
    sends item i + n - 2 before it receives item i + n - 1; so stage 0 posts the receive of item
    i's tokens before it sends item i + n - 1, and every rank's posting order is then part of one
    global order, as NCCL needs (a large send finishes only when its receive runs). With ``m``
    items in the ring, :meth:`post_before_send` posts the oldest ``m - n + 2`` token receives
    before the next item goes out: none early with fewer than n items in flight. Token messages
    have a fixed size, so their buffers are made when the receive is posted.
    """

    def __init__(self, link: _Link, last: int, rows: int) -> None:
        self.link, self.last, self.rows = link, last, rows
        self.posted: deque[tuple[Any, torch.Tensor, WaitContext]] = deque()  # for the oldest items in the ring

    def _post(self, g: int, t: int) -> None:
        link = self.link
        buf = torch.empty(3 + self.rows, dtype=torch.int64, device=link.stage.device)
        ctx = link.ctx("RECV_F", g, self.last, f"group {g}, token step {t}: next tokens from the last stage")
        self.posted.append((link.t.irecv(buf, self.last, _TAG_TOK, ctx), buf, ctx))

    def post_before_send(self, ring: deque[tuple[int, int]]) -> None:
        """Before the next item goes out: post the receives due for the oldest items in ``ring`` (see the class)."""
        n = self.link.stage.num_stages
        while n > 1 and len(self.posted) < len(ring) - n + 2:
            self._post(*ring[len(self.posted)])

    def take(self, g: int, t: int) -> Generator[None, None, torch.Tensor]:
        """Wait (on the host) for the tokens of the oldest item in the ring, group ``g`` step ``t``."""
        if not self.posted:
            self._post(g, t)
        handle, buf, ctx = self.posted.popleft()
        yield from self.link.t.wait(handle, ctx, host=True)
        return buf


def run_rank(stage: GenerationStage, transport: Transport, req: Request) -> Generator[None, None, torch.Tensor]:
    """This rank's whole part of one generate call; returns the output ``[B, L + new]`` (the same on every rank)."""
    link = _Link(transport, stage)
    s, n = stage.index, stage.num_stages
    prev, nxt, last = (s - 1) % n, (s + 1) % n, n - 1
    rows, dev = req.rows, stage.device
    groups: list[_Group | None] = []
    for g in range(req.groups):
        sl = slice(g * rows, (g + 1) * rows)
        mask = None if req.mask is None else req.mask[sl]
        groups.append(_Group(stage.module.new_cache(), mask, req.positions[sl]))
    collector = _Collector(req, stage) if stage.is_last else None

    def state(g: int) -> _Group:
        st = groups[g]
        assert st is not None, f"group {g} used after it finished"
        return st

    def emit(g: int, t: int, out: torch.Tensor) -> Iterator[None]:
        if collector is None:
            hdr = torch.tensor([_DATA, g, t, *out.shape], dtype=torch.int64, device=dev)
            what = f"group {g}, token step {t}: hidden states {list(out.shape)}"
            yield from link.send(hdr, nxt, _TAG_HDR, link.ctx("SEND_F", g, nxt, what))
            yield from link.send(out.contiguous(), nxt, _TAG_ACT, link.ctx("SEND_F", g, nxt, what))
            return
        tok, done = collector.record(g, t, out)
        msg = torch.cat([torch.tensor([g, t, int(done)], dtype=torch.int64, device=dev), tok.to(torch.int64)])
        what = f"group {g}, token step {t}: next tokens"
        yield from link.send(msg, 0, _TAG_TOK, link.ctx("SEND_F", g, 0, what))

    if stage.is_first:
        todo: deque[tuple[int, int, torch.Tensor]] = deque((g, 0, req.input_ids[g * rows : (g + 1) * rows])
                                                           for g in range(req.groups))
        expected: deque[tuple[int, int]] = deque()  # (group, step) in the ring, in the order they went out
        tokens = _TokenReceives(link, last, rows)  # their token messages' receives, posted early where NCCL needs
        while todo or expected:
            while todo and len(expected) < req.in_flight:  # start groups until in_flight are in the ring
                g, t, x = todo.popleft()
                out = _compute(stage, state(g), g, t, x)
                tokens.post_before_send(expected)
                yield from emit(g, t, out)
                expected.append((g, t))
            eg, et = expected.popleft()
            answer = yield from tokens.take(eg, et)
            g, t, done = answer[:3].tolist()
            if (g, t) != (eg, et):
                raise PipeCommError(
                    f"rank {s}, stage {s}: the last stage answered group {g} step {t}, expected group {eg} step {et}. "
                    "The ranks disagree on the messages; run the same pippy version and inputs on every rank."
                )
            if done:
                groups[g] = None  # its caches are not needed any more
            else:
                todo.append((g, t + 1, answer[3:, None]))  # next tokens [rows, 1] (a fresh buffer per answer)
        if n > 1:
            stop = torch.tensor([_STOP, 0, 0, 0, 0, 0], dtype=torch.int64, device=dev)
            yield from link.send(stop, nxt, _TAG_HDR, link.ctx("SEND_F", -1, nxt, "end of generation"))
    else:
        hdr = torch.empty(6, dtype=torch.int64, device=dev)
        what = "hidden states of group 0, token step 0 (the first message)"
        while True:
            yield from link.recv(hdr, prev, _TAG_HDR, link.ctx("RECV_F", -1, prev, what), host=True)
            kind, g, t, b, seq, h = hdr.tolist()
            if kind == _STOP:
                if not stage.is_last:
                    yield from link.send(hdr.clone(), nxt, _TAG_HDR, link.ctx("SEND_F", -1, nxt, "end of generation"))
                break
            buf = torch.empty((b, seq, h), dtype=stage.dtype, device=dev)
            what = f"group {g}, token step {t}: hidden states {[b, seq, h]}"
            x = yield from link.recv(buf, prev, _TAG_ACT, link.ctx("RECV_F", g, prev, what))
            yield from emit(g, t, _compute(stage, state(g), g, t, x))
            what = f"the hidden states that follow group {g}, token step {t}"
    yield from link.flush()
    return (yield from _share(link, req, collector))


def _share(link: _Link, req: Request, collector: _Collector | None) -> Generator[None, None, torch.Tensor]:
    """The last stage sends the output to every other rank (shape first, then the tokens)."""
    stage = link.stage
    n, last = stage.num_stages, stage.num_stages - 1
    if collector is not None:
        out = collector.result()
        for peer in range(n - 1):
            what = f"the generated tokens {list(out.shape)}"
            yield from link.send(torch.tensor([out.shape[1]], dtype=torch.int64, device=stage.device), peer, _TAG_OUT_HDR,
                                 link.ctx("SEND_F", -1, peer, what))
            yield from link.send(out, peer, _TAG_OUT, link.ctx("SEND_F", -1, peer, what))
        yield from link.flush()
        return out
    cols = torch.empty(1, dtype=torch.int64, device=stage.device)
    yield from link.recv(cols, last, _TAG_OUT_HDR, link.ctx("RECV_F", -1, last, "the size of the generated tokens"))
    out = torch.empty((req.input_ids.shape[0], int(cols[0])), dtype=torch.int64, device=stage.device)
    yield from link.recv(out, last, _TAG_OUT, link.ctx("RECV_F", -1, last, "the generated tokens"))
    return out

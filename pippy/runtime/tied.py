"""Tied weights at the end of a step: sum the gradients of every copy so each copy holds the total.

A tensor read by several stages (GPT-2's embedding and LM head, in ``tied_weights="replicate"``
mode) lives as one copy per stage. Each copy's backward adds only its own share; after the
last action of a step, the ranks holding copies exchange this step's shares (the gradient
minus what it held before the step, so gradients accumulated over steps without ``zero_grad``
are not counted twice) and every copy ends with the same sum, as in the unpipelined model.

    >>> # tied = TiedGrads(pipe, {s: stage}, schedule.stage_to_rank, transport)
    >>> # tied.snapshot(); ...run the step...; for _ in tied.sync(): pass
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from pippy.runtime.comm import Transport, WaitContext
from pippy.runtime.stage import PipelineStage

__all__ = ["TiedGrads"]

_TAG_BASE = 1 << 29  # above every activation / gradient tag of a step


class TiedGrads:
    """Gradient exchange for the tied tensors (``pipe.shared``) this rank holds copies of.

        >>> # TiedGrads(pipe, stages_by_index, stage_to_rank, transport).snapshot()
    """

    def __init__(self, pipe: Any, stages: Mapping[int, PipelineStage], stage_to_rank: Sequence[int],
                 transport: Transport) -> None:
        self.pipe, self.stages, self.stage_to_rank, self.transport = pipe, stages, stage_to_rank, transport
        self.rank = transport.rank
        self._before: dict[int, torch.Tensor] = {}

    def snapshot(self) -> None:
        """Remember the grads tied copies hold before this step (equal on every copy after a sync)."""
        self._before = {}
        for sp in self.pipe.shared:
            if not sp.requires_grad:
                continue  # buffers and frozen tensors are not synchronized
            for s, f in sp.uses:
                if s in self.stages:
                    p = self.stages[s].submod.get_parameter(f)
                    if p.grad is not None:
                        self._before[id(p)] = p.grad.detach().clone()

    def sync(self) -> Iterator[None]:
        """Sum this step's gradient shares of every tied tensor across its copies (a generator: waits yield)."""
        for gi, sp in enumerate(self.pipe.shared):
            if not sp.requires_grad:
                continue
            mine = [(s, f) for s, f in sp.uses if s in self.stages]
            if not mine:
                continue
            ranks = sorted({self.stage_to_rank[s] for s, _ in sp.uses})
            params = list({id(p): p for p in (self.stages[s].submod.get_parameter(f) for s, f in mine)}.values())
            local = sum((self._share(p) for p in params[1:]), self._share(params[0]).clone())
            total = local
            leader, tag, name = ranks[0], _TAG_BASE + gi, sp.uses[0][1]

            def ctx(peer: int, what: str, stage: int = mine[0][0]) -> WaitContext:
                return WaitContext(self.rank, stage, "W", 0, peer, what)  # errors name the stage's weight-grad step

            if len(ranks) > 1:
                if self.rank == leader:
                    for peer in ranks[1:]:
                        buf = torch.empty_like(local)
                        yield from self.transport.wait(self.transport.irecv(buf, peer, tag), ctx(peer, f"tied-weight grad {name}"))
                        total = total + buf
                    hs = [self.transport.isend(total, peer, tag) for peer in ranks[1:]]
                    for peer, h in zip(ranks[1:], hs):
                        yield from self.transport.wait(h, ctx(peer, "send summed tied-weight grad"))
                else:
                    yield from self.transport.wait(self.transport.isend(local, leader, tag), ctx(leader, "send tied-weight grad"))
                    total = torch.empty_like(local)
                    yield from self.transport.wait(self.transport.irecv(total, leader, tag), ctx(leader, f"summed tied-weight grad {name}"))
            for p in params:
                prev = self._before.get(id(p))
                p.grad = total.clone() if prev is None else prev + total

    def _share(self, p: torch.Tensor) -> torch.Tensor:
        """This step's gradient of copy ``p`` (zeros if it got none)."""
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        prev = self._before.get(id(p))
        return g - prev if prev is not None else g

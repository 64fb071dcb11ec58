"""Tied weights at the end of a step: sum the gradients of every copy so each copy holds the total.

A tensor read by several stages (GPT-2's embedding and LM head, in ``tied_weights="replicate"``
mode) lives as one copy per stage. Each copy's backward adds only its own share; after the
last action of a step, the ranks holding copies exchange this step's shares (the gradient
minus what it held before the step, so gradients accumulated over steps without ``zero_grad``
are not counted twice) and every copy ends with the same sum, as in the unpipelined model.

The executor calls ``snapshot()`` before a training step and drives ``sync()`` (a generator:
waits yield on the in-process transport) after the step's last action.

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> from pippy.runtime.localcomm import LocalTransport
    >>> from pippy.runtime.stage import Stage
    >>> lin = torch.nn.Linear(2, 2)
    >>> class Twice(torch.nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__(); self.lin = lin
    ...     def forward(self, x): return self.lin(torch.tanh(self.lin(x)))
    >>> pipe = pipeline(Twice(), 1, (torch.ones(1, 2),), split_spec={"lin": SplitPoint.END})
    >>> [sp.stages for sp in pipe.shared]                      # weight and bias: a copy in each stage
    [(0, 1), (0, 1)]
    >>> stages, ends = [Stage(pipe, 0), Stage(pipe, 1)], LocalTransport.world(2)
    >>> tied = [TiedGrads(pipe, {s: stages[s]}, (0, 1), ends[s]) for s in (0, 1)]
    >>> for s in (0, 1):
    ...     tied[s].snapshot()
    ...     stages[s].submod.get_parameter("lin.weight").grad = torch.full((2, 2), s + 1.0)
    >>> running = [t.sync() for t in tied]
    >>> while running:                                         # drive both ranks in turn
    ...     running = [g for g in running if next(g, StopIteration) is not StopIteration]
    >>> [st.submod.get_parameter("lin.weight").grad[0, 0].item() for st in stages]
    [3.0, 3.0]
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from pippy.frontend.notice import warn_user
from pippy.frontend.pipe import SplitPipe
from pippy.runtime.comm import EDGE_TAGS
from pippy.runtime.stage import Stage
from pippy.runtime.transport import Transport, WaitContext

__all__ = ["TiedGrads"]

_WARNED: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()  # tied copies whose gradient hook was warned about
_TAG_BASE = 2 * EDGE_TAGS  # above every activation / gradient tag of a step and their shape headers


class TiedGrads:
    """Gradient exchange for the tied tensors (``pipe.shared``) this rank holds copies of (see the module)."""

    def __init__(self, pipe: SplitPipe, stages: Mapping[int, Stage], stage_to_rank: Sequence[int],
                 transport: Transport) -> None:
        self.pipe, self.stages, self.stage_to_rank, self.transport = pipe, stages, stage_to_rank, transport
        self.rank = transport.rank
        self._before: dict[int, torch.Tensor] = {}

    def snapshot(self) -> None:
        """Remember the grads tied copies hold before this step (equal on every copy after a sync)."""
        self._before = {}
        hooked: list[str] = []
        for sp in self.pipe.shared:
            if not sp.requires_grad:
                continue  # buffers and frozen tensors are not synchronized
            for s, f in sp.uses:
                if s in self.stages:
                    p = self.stages[s].unwrapped.get_parameter(f)
                    if p.grad is not None:
                        self._before[id(p)] = p.grad.detach().clone()
                    if (p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)) and p not in _WARNED:
                        _WARNED.add(p)
                        hooked.append(f"stage {s}'s {f} (copies in stages {list(sp.stages)})")
        if hooked:
            warn_user(
                f"{', '.join(hooked)}: a copy of a tied weight (tied_weights='replicate') has a gradient hook. Each "
                "copy's hook sees only its stage's share of the gradient, before pippy sums the copies at the end of "
                "the step (the model's hook sees the sum). A hook linear in the gradient (scaling) still gives the "
                "same result; one that is not (clamping, clipping, moving .grad elsewhere) does not. Use "
                "pipeline(..., tied_weights='transmit'), or act on the gradients after step()"
            )

    def sync(self) -> Iterator[None]:
        """Sum this step's gradient shares of every tied tensor across its copies (a generator: waits yield).

        A flag beside each share says whether a copy got a gradient this step and whether it is frozen
        (``requires_grad_(False)`` now): when no copy got one, or any copy is frozen (one tensor in the
        plain model: frozen everywhere), every copy keeps the gradient it had before the step.
        """
        for gi, sp in enumerate(self.pipe.shared):
            if not sp.requires_grad:
                continue
            mine = [(s, f) for s, f in sp.uses if s in self.stages]
            if not mine:
                continue
            ranks = sorted({self.stage_to_rank[s] for s, _ in sp.uses})
            params = list({id(p): p for p in (self.stages[s].unwrapped.get_parameter(f) for s, f in mine)}.values())
            shares = [g for g in (self._share(p) for p in params) if g is not None]
            local = sum(shares[1:], shares[0].clone()) if shares else torch.zeros_like(_local(params[0]))
            # on the host, read without a sync; ordered transports (NCCL) send device tensors only: no flags there
            flags = torch.tensor([bool(shares), any(not p.requires_grad for p in params)], dtype=torch.uint8)
            flagged = not self.transport.ordered
            total = local
            leader, tag, name = ranks[0], _TAG_BASE + gi, sp.uses[0][1]
            stage = mine[0][0]

            if len(ranks) > 1:
                tp = self.transport
                if self.rank == leader:
                    for peer in ranks[1:]:
                        buf, got = torch.empty_like(local), torch.empty_like(flags)
                        yield from self._swap(tp.irecv, buf, got, flagged, peer, tag, stage, f"tied-weight grad {name}")
                        total, flags = total + buf, flags | got if flagged else flags
                    for peer in ranks[1:]:
                        yield from self._swap(tp.isend, total, flags, flagged, peer, tag, stage, "send summed tied-weight grad")
                else:
                    yield from self._swap(tp.isend, local, flags, flagged, leader, tag, stage, "send tied-weight grad")
                    total, got = torch.empty_like(local), torch.empty_like(flags)
                    yield from self._swap(tp.irecv, total, got, flagged, leader, tag, stage,
                                          f"summed tied-weight grad {name}")
                    flags = got if flagged else flags
            reached, frozen = (bool(v) for v in flags.numpy())
            if not flagged:  # this rank's copies alone say (NCCL): a copy it got no gradient for keeps its own
                reached = True
            for p in params:
                prev = self._before.get(id(p))
                if frozen or not reached:  # as the plain model's one tensor: no gradient this step
                    p.grad = prev
                else:
                    p.grad = _like(p, total.clone() if prev is None else _local(prev) + total)

    def _swap(self, post: Any, value: torch.Tensor, flags: torch.Tensor, flagged: bool, peer: int, tag: int,
              stage: int, what: str) -> Iterator[None]:
        """Post ``value`` (and ``flags`` when ``flagged``, in the band above the shares') to or from ``peer``, then
        wait for them; errors name the stage's weight-grad step."""
        ctx = WaitContext(self.rank, stage, "W", 0, peer, what)
        hs = ([post(flags, peer, tag + EDGE_TAGS)] if flagged else []) + [post(value, peer, tag)]
        for h in hs:
            yield from self.transport.wait(h, ctx)

    def _share(self, p: torch.Tensor) -> torch.Tensor | None:
        """This step's gradient of copy ``p`` (None if it got none); this rank's shard of it for a sharded (FSDP2)
        copy: the copies are sharded alike over the data-parallel ranks, so shards add up as wholes do."""
        if p.grad is None:
            return None
        g = _local(p.grad)
        prev = self._before.get(id(p))
        return g - _local(prev) if prev is not None else g


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what point-to-point messages carry), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def _like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` as the gradient of ``p``: a DTensor with ``p``'s mesh and placements when ``p`` is one."""
    if not isinstance(p, DTensor):
        return local
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())

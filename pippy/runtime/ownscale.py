"""A model's own mean loss over counted targets (``ignore_index``), trained exactly across micro-batches.

``F.cross_entropy(logits, labels)`` in ``forward`` (a Hugging Face model given ``labels=``) averages over the
targets it counts, so the full batch's loss is ``sum_i c_i * mean_i / N`` (``c_i`` a micro-batch's count, ``N``
the batch's), not the mean of the micro-batch means. The loss stage counts each micro-batch's targets as its
forward runs (:class:`~pippy.runtime.owncount.OwnLossCounts`) and seeds its backward with ``c_i / c_ref`` times
the usual mean scale (``c_ref``: the step's first count; 1 under data parallelism, where replicas differ). ``N`` is
known only after the last forward: at the step's end the loss stage's rank sends ``f = m * c_ref * dp / N`` (``N``
summed over the data-parallel ranks) to every other rank of the pipeline, and each rank multiplies what the step
added to its gradients by ``f``. With equal counts ``f`` is exactly 1 and the seeds are the usual ones, bit for
bit. One 8-byte message per rank and step, after every action. The merged loss is weighted by the counts too.

    >>> import torch
    >>> scale = OwnScale(None, 0.5, None)
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> p.grad = torch.full((2,), 3.0)
    >>> scale.snapshot([p])
    >>> p.grad += torch.tensor([10.0, 20.0])     # what the step added
    >>> scale.rescale([p], torch.tensor([0.5], dtype=torch.float64))
    >>> p.grad
    tensor([ 8., 13.])
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from pippy.frontend.notice import warn_user
from pippy.runtime.comm import EDGE_TAGS
from pippy.runtime.dpgroup import DataParallelWorld
from pippy.runtime.dploss import global_count
from pippy.runtime.owncount import OwnLossCounts, show_count
from pippy.runtime.stageerror import StageError
from pippy.runtime.transport import Transport, WaitContext

__all__ = ["OWN_COUNT_TAG", "OwnScale", "own_weighted", "weigh_own_loss"]

_WARNED: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()  # parameters whose gradient hooks were warned about
OWN_COUNT_TAG = 5 * EDGE_TAGS  # above tied grads (2-3x) and generation (4x): see pippy.runtime.plan


class OwnScale:
    """One step's counts of the model's own counted-mean loss on one rank, and the factor its gradients get.

    ``counter`` (the loss stage's rank only; None elsewhere) counts a micro-batch's targets; ``scale`` is the
    step's mean loss scale (``1/m`` times the data-parallel factor); ``world`` the loss stage's DP world.
    """

    def __init__(self, counter: OwnLossCounts | None, scale: float, world: DataParallelWorld | None,
                 warn_only: bool = False) -> None:
        self.counter, self.scale, self.world = counter, scale, world
        self.warn_only = warn_only  # a loss pippy cannot make exact (a (loss, logits) tuple): counts are only checked
        self.counts: list[torch.Tensor] = []
        self.ref: torch.Tensor | None = None  # c_ref: the first count of the step (1 under DP)
        self.f = torch.ones(1, dtype=torch.float64)  # the step's factor, once exchanged
        self._before: dict[int, torch.Tensor] = {}

    def snapshot(self, params: Sequence[torch.Tensor]) -> None:
        """Keep the gradients the step starts from (accumulated over earlier steps): only the step's are scaled."""
        if self.warn_only:
            return
        self._before = {id(p): p.grad.detach().clone() for p in params if p.grad is not None}
        hooked = [p for p in params if (p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None))
                  and p not in _WARNED]
        if hooked:
            _WARNED.update(hooked)
            warn_user(
                f"{len(hooked)} parameter(s) of this rank have gradient hooks, and the model computes its own mean "
                "loss over counted targets (ignore_index): each micro-batch's gradient is seeded with its count "
                "relative to the step's first, and scaled by the batch's total count only at the end of the step, so "
                "the hooks see gradients on another scale than the model's. A hook linear in the gradient (scaling) "
                "still gives the same result; one that is not (clamping, clipping, moving .grad elsewhere) does not. "
                "Act on the gradients after step() instead"
            )

    def count(self, inputs: Sequence[Any], source: Any = None) -> torch.Tensor:
        """Count one micro-batch's targets on its stage inputs (``source``: the stage's running module, whose class
        weights a count reads), and keep the count (for the merged loss too)."""
        assert self.counter is not None
        c = self.counter.counts(inputs, source)[0]
        self.counts.append(c)
        return c

    def note(self, mb: int, inputs: Sequence[Any], training: bool, where: str, source: Any = None) -> None:
        """Count micro-batch ``mb`` of a step that does not train on this loss (a ``loss_fn``, or ``eval``): for the
        merged loss; in training, warn when counts differ (the ``loss_fn`` may train on this loss, with equal weights)."""
        self.count(inputs, source)
        if self.counter is not None and (training or self.warn_only):
            self.counter.check(mb, inputs, where, loss_fn=not self.warn_only, source=source)

    def seed(self, loss: torch.Tensor, count: torch.Tensor, check_finite: bool, where: str) -> torch.Tensor:
        """A micro-batch's backward seed: its mean loss times ``count / c_ref`` and the mean scale. With
        ``check_finite``, a NaN loss is an error only where the micro-batch counts targets (else it adds nothing)."""
        if self.counter is not None:
            self.counter.check_weights(count, where)
        if self.ref is None:
            self.ref = torch.ones_like(count) if self.world is not None else torch.where(count > 0, count, 1)
        if check_finite and not bool((torch.isfinite(loss) | (count == 0)).all()):
            raise StageError(f"{where}: the model's own loss of this micro-batch is {loss.item()} over {show_count(count)} "
                             "counted targets; expected a finite number (check_finite=True)")
        ratio = count.to(loss.device, loss.dtype) / self.ref.to(loss.device, loss.dtype)
        return loss * (ratio * self.scale)

    def factor(self, trained: bool, timeout: float, where: str) -> torch.Tensor:
        """``m * c_ref * dp / N`` for the step (``N`` summed over the DP ranks); 1 when it did not train on the
        loss or counted no target (then every seed was 0, as the full batch's gradients are)."""
        if not trained or not self.counts or self.ref is None:
            return torch.ones(1, dtype=torch.float64)
        n = torch.stack(self.counts).sum()
        if self.world is not None:
            n = global_count(self.world, n, timeout, where)
        size = self.world.size if self.world is not None else 1
        n = n.to(torch.float64)
        f = len(self.counts) * self.ref.to(torch.float64) * size / torch.where(n > 0, n, torch.ones_like(n))
        return torch.where(n > 0, f, torch.ones_like(f)).reshape(1)

    def exchange(self, transport: Transport, rank: int, loss_rank: int, stage: int, device: torch.device,
                 trained: bool) -> Iterator[None]:
        """Send the step's factor from ``loss_rank`` to every other rank (a generator: waits yield); sets ``f``."""
        if self.warn_only:  # every rank's pipe says so alike: no message
            return
        peers = [r for r in range(transport.world_size) if r != loss_rank]
        on = device if transport.ordered else torch.device("cpu")  # NCCL sends device tensors; gloo host ones
        if rank == loss_rank:
            where = f"rank {rank}, stage {stage}, action step end (the own loss's target count, every micro-batch)"
            self.f = self.factor(trained, transport.timeout, where)
            msg = self.f.to(on)
            handles = [(transport.isend(msg, r, OWN_COUNT_TAG), r) for r in peers]
            for h, r in handles:
                yield from transport.wait(h, WaitContext(rank, stage, "END", 0, r, "send the own loss's count factor"))
        else:
            buf = torch.ones(1, dtype=torch.float64, device=on)
            ctx = WaitContext(rank, stage, "END", 0, loss_rank,
                              "the factor for the model's own counted-mean loss, sent at the loss stage's step end")
            yield from transport.wait(transport.irecv(buf, loss_rank, OWN_COUNT_TAG, ctx), ctx)
            self.f = buf

    def rescale(self, params: Sequence[torch.Tensor], f: torch.Tensor) -> None:
        """Multiply what this step added to each ``.grad`` by ``f`` (nothing at all where ``f`` is 1 on the host)."""
        if _is_one(f):
            return
        cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        for p in params:
            g = p.grad
            if g is None:
                continue
            k = (g.device, g.dtype)
            if k not in cast:
                cast[k] = f.reshape(()).to(g.device, g.dtype)
            before = self._before.get(id(p))
            if before is None:
                g.mul_(cast[k])
            else:  # where f is 1 the sum stays as it was, bit for bit
                g.copy_(torch.where(cast[k] == 1, g, before + (g - before) * cast[k]))

    def scale_user_grads(self, grads: list[tuple[torch.Tensor, torch.Tensor]], f: torch.Tensor) -> None:
        """Scale the gradients kept for the user's own tensors (``x.requires_grad_()``) before they flow."""
        if _is_one(f):
            return
        for k, (x, g) in enumerate(grads):
            grads[k] = (x, g * f.reshape(()).to(g.device, g.dtype))


def _is_one(f: torch.Tensor) -> bool:
    """Whether the factor is 1, known on the host without a sync (a device tensor is never read: it may be 1)."""
    return f.device.type == "cpu" and float(f) == 1.0


def own_weighted(counter: OwnLossCounts | None, pipe: Any, outputs: list[Any], counts: list[torch.Tensor]) -> list[Any]:
    """``outputs`` (per micro-batch) with the own counted loss weighted by ``counts``, when the pipe merges it as a
    mean; else as they are."""
    if counter is None or not outputs or len(counts) != len(outputs):
        return outputs
    k = counter.positions[0]
    reductions = getattr(pipe, "output_reductions", None) or []
    if k >= len(reductions) or reductions[k] != "mean":
        return outputs
    return weigh_own_loss(outputs, k, counts, pytree.tree_flatten, pytree.tree_unflatten)


def weigh_own_loss(outputs: list[Any], index: int, counts: Sequence[torch.Tensor], flatten: Any,
                   unflatten: Any) -> list[Any]:
    """Each micro-batch's output with its own loss (flat leaf ``index``) times ``m * c_i / sum(c)``: merged as a
    mean, that is the full batch's counted mean.

        >>> outs = weigh_own_loss([torch.tensor(1.0), torch.tensor(4.0)], 0, [torch.tensor(1), torch.tensor(3)],
        ...                       lambda o: ([o], None), lambda leaves, spec: leaves[0])
        >>> (sum(outs) / 2).item()   # (1 * 1 + 3 * 4) / 4
        3.25
    """
    total = torch.stack([c.reshape(()) for c in counts]).sum()
    m = len(outputs)
    out = []
    for o, c in zip(outputs, counts):
        leaves, spec = flatten(o)
        leaf = leaves[index]
        leaves = list(leaves)
        w = m * c.to(leaf.device, leaf.dtype) / total.to(leaf.device, leaf.dtype)
        leaves[index] = torch.where(c.to(leaf.device) > 0, leaf * w, torch.zeros_like(leaf))  # all padding: NaN * 0
        out.append(unflatten(leaves, spec))
    return out

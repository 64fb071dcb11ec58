"""A model's own mean loss over counted targets (``ignore_index``), trained exactly across micro-batches.

``F.cross_entropy(logits, labels)`` in ``forward`` (a Hugging Face model given ``labels=``) averages over the
targets it counts, so the full batch's loss is ``sum_i sum_loss_i / N``, with ``N`` the count over every
micro-batch, not the mean of the micro-batch means. The loss stage counts each micro-batch's targets as its
forward runs (:class:`~pippy.runtime.owncount.OwnLossCounts`) and seeds that micro-batch's backward with its count
``c_i`` (``c_i * mean_i`` is its sum), so every rank accumulates the sum's gradients. ``N`` is known only after the
last forward: at the end of the step the loss stage's rank sends it to every other rank of the pipeline (summed
over the data-parallel ranks first), and each rank divides the gradients this step added by it. One tiny message
per rank and step, after every action; no host sync. The merged loss is weighted by the counts too.

    >>> import torch
    >>> from types import SimpleNamespace
    >>> scale = OwnScale(None, [], 1.0, None)
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> p.grad = torch.full((2,), 3.0)
    >>> scale.snapshot([p])
    >>> p.grad += torch.tensor([10.0, 20.0])     # the step's sum-gradients
    >>> scale.rescale([p], torch.tensor(5))
    >>> p.grad
    tensor([5., 7.])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from pippy.runtime.comm import EDGE_TAGS
from pippy.runtime.dpgroup import DataParallelWorld
from pippy.runtime.dploss import global_count
from pippy.runtime.owncount import OwnLossCounts
from pippy.runtime.transport import Transport, WaitContext

__all__ = ["OWN_COUNT_TAG", "OwnScale", "own_weighted", "weigh_own_loss"]

OWN_COUNT_TAG = 5 * EDGE_TAGS  # above tied grads (2-3x) and generation (4x): see pippy.runtime.plan


class OwnScale:
    """One training step's counts for the model's own counted-mean loss on one rank.

    ``counter`` (the loss stage's rank only; None elsewhere) counts a micro-batch's targets; ``factor`` is the
    data-parallel seed factor of a sum (``seed_factor(world, "sum")``); ``world`` the loss stage's DP world.
    """

    def __init__(self, counter: OwnLossCounts | None, counts: list[torch.Tensor], factor: float,
                 world: DataParallelWorld | None) -> None:
        self.counter, self.counts, self.factor, self.world = counter, counts, factor, world
        self._before: dict[int, torch.Tensor] = {}
        self.n = torch.zeros(1, dtype=torch.int64)  # the step's count, once exchanged

    def snapshot(self, params: Sequence[torch.Tensor]) -> None:
        """Keep the gradients the step starts from (accumulated over earlier steps): only this step's are divided."""
        self._before = {id(p): p.grad.detach().clone() for p in params if p.grad is not None}

    def seed(self, loss: torch.Tensor, inputs: Sequence[Any]) -> torch.Tensor:
        """Micro-batch ``i``'s backward seed: its mean times its count (its sum), times the DP factor."""
        assert self.counter is not None
        count = self.counter.counts(inputs)[0]
        self.counts.append(count)
        return loss * (count.to(loss.dtype) * self.factor)

    def total(self, trained: bool, timeout: float, where: str) -> torch.Tensor:
        """The step's count: this pipeline's, summed over the DP ranks; 0 when the step did not train on it."""
        mine = torch.stack(self.counts).sum() if self.counts and trained else torch.zeros((), dtype=torch.int64)
        if trained and self.world is not None:
            mine = global_count(self.world, mine, timeout, where)
        return mine.reshape(1).to(torch.int64)

    def exchange(self, transport: Transport, rank: int, loss_rank: int, stage: int, device: torch.device,
                 trained: bool) -> Iterator[None]:
        """Send the step's count from ``loss_rank`` to every other rank (a generator: waits yield); sets ``self.n``."""
        peers = [r for r in range(transport.world_size) if r != loss_rank]
        on = device if transport.ordered else torch.device("cpu")  # NCCL sends device tensors; gloo host ones
        if rank == loss_rank:
            where = f"rank {rank}, stage {stage}, action step end (the own loss's target count, every micro-batch)"
            self.n = self.total(trained, transport.timeout, where)
            msg = self.n.to(on)
            handles = [(transport.isend(msg, r, OWN_COUNT_TAG), r) for r in peers]
            for h, r in handles:
                yield from transport.wait(h, WaitContext(rank, stage, "W", 0, r, "send the step's target count"))
        else:
            buf = torch.zeros(1, dtype=torch.int64, device=on)
            ctx = WaitContext(rank, stage, "W", 0, loss_rank,
                              "the step's target count of the model's own loss (sent after the loss stage's step)")
            yield from transport.wait(transport.irecv(buf, loss_rank, OWN_COUNT_TAG, ctx), ctx)
            self.n = buf

    def rescale(self, params: Sequence[torch.Tensor], n: torch.Tensor) -> None:
        """Divide what this step added to each ``.grad`` by ``n`` (nothing when ``n`` is 0: not trained on)."""
        n = n.reshape(())
        if n.device.type == "cpu" and int(n) == 0:
            return
        for p in params:
            if p.grad is None:
                continue
            d = n.to(p.grad.device)
            before = self._before.get(id(p))
            keep = torch.where(d == 0, torch.ones_like(d), d).to(p.grad.dtype)  # 0: the step trained on another loss
            if before is None:
                p.grad.div_(keep)
            else:
                p.grad.sub_(before).div_(keep).add_(before)

    def scale_user_grads(self, grads: list[tuple[torch.Tensor, torch.Tensor]], n: torch.Tensor) -> None:
        """Divide the gradients kept for the user's own tensors (``x.requires_grad_()``) by ``n`` before they flow."""
        for k, (x, g) in enumerate(grads):
            d = n.reshape(()).to(g.device)
            grads[k] = (x, g / torch.where(d == 0, torch.ones_like(d), d).to(g.dtype))


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

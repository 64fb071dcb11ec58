"""A loss averaged over the targets it counts (``ignore_index``, class weights), kept exact across micro-batches.

``nn.CrossEntropyLoss()`` averages over the targets that are not ``ignore_index`` (weighted by
``weight`` when given), so micro-batches with more padding count for less than one ``1/m`` share.
Averaging micro-batch means is then not the full batch's mean. The exact form: each micro-batch's
*sum* divided by the full batch's count. This holds with label smoothing too.

    >>> import torch
    >>> cm = counted_mean(torch.nn.CrossEntropyLoss())
    >>> out, t = torch.randn(4, 3), torch.tensor([0, -100, 2, -100])
    >>> parts = [cm.sum_fn(o, y) / cm.count(t) for o, y in zip(out.split(2), t.split(2))]
    >>> torch.allclose(sum(parts), torch.nn.functional.cross_entropy(out, t))
    True
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CountedMean", "counted_mean"]

_FUNCS = {F.cross_entropy, F.nll_loss}


@dataclass(frozen=True, slots=True)
class CountedMean:
    """A mean-reduced class-index loss as its sum-reduced form (``sum_fn``) and what the mean divides by (``count``).

        >>> CountedMean(torch.nn.functional.nll_loss, -100, None).count(torch.tensor([1, -100, 0]))
        tensor(2)
    """

    sum_fn: Callable[..., torch.Tensor]
    ignore_index: int
    weight: torch.Tensor | None

    def count(self, target: torch.Tensor) -> torch.Tensor:
        """The mean's divisor for ``target``: its targets other than ``ignore_index``, weighted by their class."""
        valid = target != self.ignore_index
        if self.weight is None:
            return valid.sum()
        w = self.weight.to(target.device)[torch.where(valid, target, 0)]
        return (w * valid).sum()

    def applies(self, target: Any) -> bool:
        """Whether ``target`` holds class indices (probability targets average over rows, which a split keeps)."""
        return isinstance(target, torch.Tensor) and not target.is_floating_point() and not target.is_complex()


def counted_mean(loss_fn: Any) -> CountedMean | None:
    """The counted form of ``loss_fn`` when it is a mean-reduced ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` (not a subclass),
    ``F.cross_entropy`` / ``F.nll_loss``, or a ``functools.partial`` of those; else None.

        >>> counted_mean(torch.nn.MSELoss()) is None, counted_mean(torch.nn.NLLLoss(reduction="sum")) is None
        (True, True)
    """
    if type(loss_fn) in (nn.CrossEntropyLoss, nn.NLLLoss):  # a subclass may add terms its own way: left alone
        if loss_fn.reduction != "mean":
            return None
        summed = copy.copy(loss_fn)
        summed.reduction = "sum"
        return CountedMean(summed, int(loss_fn.ignore_index), loss_fn.weight)
    func, args, kwargs = loss_fn, (), {}
    if isinstance(loss_fn, functools.partial):
        func, args, kwargs = loss_fn.func, loss_fn.args, dict(loss_fn.keywords)
    if func not in _FUNCS or args or kwargs.get("reduction", "mean") != "mean" or kwargs.get("size_average") is not None \
            or kwargs.get("reduce") is not None:
        return None
    weight = kwargs.get("weight")
    return CountedMean(functools.partial(func, **{**kwargs, "reduction": "sum"}), int(kwargs.get("ignore_index", -100)),
                       weight if isinstance(weight, torch.Tensor) else None)

"""How to fix a loss that failed: advice that fits what the model gave, what the target is, what loss_fn returned.

    >>> import torch
    >>> print(loss_fn_fix({"logits": torch.ones(2, 4), "aux": torch.ones(())}, torch.ones(2, 4)))
    the model returns a dict, not a tensor: make loss_fn take the tensor it scores from it, e.g. \
loss_fn=lambda out, y: F.mse_loss(out['logits'], y) (the model's output stays as it is)
    >>> print(loss_value_fix(0.5))
    loss_fn returned a Python float: return the tensor itself (no .item() or float()), so that backward can run
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["loss_fn_fix", "loss_value_fix", "scalar_first_hint"]

_GENERIC = ("make step(target=...) match the model's output (batch size along the split dim, dtype, structure: a "
            "tensor where loss_fn expects one, not a list), or pass target_chunk_spec= to split it like the output")


def loss_fn_fix(out: Any, target: Any, fits: bool = True) -> str:
    """The fix for ``loss_fn(out, target)`` raising; ``fits``: the error speaks of shapes, dtypes or structure.

        >>> print(loss_fn_fix(torch.ones(2, 4), torch.ones(2, 4, dtype=torch.int64)))
        the target is int64 and the output float32: give the target the dtype loss_fn expects (y.float() for \
a regression or soft-label loss; class indices, y.long() of shape [batch], for cross_entropy)
        >>> print(loss_fn_fix(None, torch.ones(2)))
        the model's forward returns None: return its output (pipeline() warned of this), then score it in loss_fn
    """
    if out is None:
        return "the model's forward returns None: return its output (pipeline() warned of this), then score it in loss_fn"
    if not isinstance(out, torch.Tensor) and isinstance(target, torch.Tensor):
        if isinstance(out, Mapping):
            key = next((k for k, v in out.items() if isinstance(v, torch.Tensor) and v.dim() > 0), next(iter(out), 0))
            pick = f"out[{key!r}]"
        else:
            pick = "out[0]"
        return (f"the model returns a {type(out).__name__}, not a tensor: make loss_fn take the tensor it scores from "
                f"it, e.g. loss_fn=lambda out, y: F.mse_loss({pick}, y) (the model's output stays as it is)")
    if isinstance(out, torch.Tensor) and not isinstance(target, torch.Tensor) and target is not None:
        return (f"the target is a {type(target).__name__} where the output is a tensor: pass step(target=...) as a "
                "tensor (torch.stack / torch.tensor), or a loss_fn that reads this structure")
    if isinstance(out, torch.Tensor) and isinstance(target, torch.Tensor) and fits:
        if out.dim() and target.dim() and out.shape[0] != target.shape[0]:
            return (f"the target has {target.shape[0]} rows in this micro-batch and the output {out.shape[0]}: pass "
                    "the target of the same batch as the inputs (split like them), or target_chunk_spec= to split it "
                    "along another dim")
        if out.dtype != target.dtype and (out.is_floating_point() != target.is_floating_point()):
            t, o = str(target.dtype).removeprefix("torch."), str(out.dtype).removeprefix("torch.")
            return (f"the target is {t} and the output {o}: give the target the dtype loss_fn expects (y.float() for "
                    "a regression or soft-label loss; class indices, y.long() of shape [batch], for cross_entropy)")
        if out.shape != target.shape:
            return (f"the target's shape {list(target.shape)} differs from the output's {list(out.shape)} beyond the "
                    "batch: give loss_fn the target it expects for this output (check it unpipelined: "
                    "loss_fn(model(x), y))")
    if fits:
        return _GENERIC
    return ("the error is raised inside loss_fn itself (its traceback is chained above); fix it there, e.g. by calling "
            "loss_fn on these values alone")


def loss_value_fix(loss: Any) -> str:
    """The fix for a ``loss_fn`` result that is not a scalar tensor.

        >>> print(loss_value_fix(None))
        loss_fn returned None: is its return statement missing? Return the loss tensor
        >>> print(loss_value_fix(torch.ones(2, 3)))
        reduce it to a scalar (reduction='mean' or 'sum', or .mean() / .sum())
    """
    if loss is None:
        return "loss_fn returned None: is its return statement missing? Return the loss tensor"
    if isinstance(loss, (int, float)):
        return (f"loss_fn returned a Python {type(loss).__name__}: return the tensor itself (no .item() or float()), so "
                "that backward can run")
    if isinstance(loss, torch.Tensor):
        return "reduce it to a scalar (reduction='mean' or 'sum', or .mean() / .sum())"
    return f"return one scalar tensor, not a {type(loss).__name__} (e.g. sum the parts of a loss into one)"


def scalar_first_hint(pipe: Any) -> str:
    """A hint for an output whose first element is a scalar, as a ``(loss, logits)`` tuple is.

        >>> from types import SimpleNamespace as M
        >>> scalar_first_hint(M(stage_infos=[M(outputs=[M(shape=()), M(shape=(2, 5))])]))[:30]
        ' Its first output is a scalar:'
    """
    outs = pipe.stage_infos[-1].outputs
    if len(outs) < 2 or outs[0].shape != ():
        return ""
    return (" Its first output is a scalar: if that is the loss (a (loss, logits) tuple, as Hugging Face models give "
            "with return_dict=False), return a dict with a 'loss' key (return_dict=True) or the loss alone, and "
            "step() trains on it.")

"""The loss of a pipeline step: the user's loss_fn (or the model's own loss) on the last stage, with clear errors.

    >>> import torch
    >>> describe(torch.zeros(2, 3, dtype=torch.float64)), describe({"logits": 1})
    ('float64[2, 3]', "dict with keys ['logits'] and no 'loss' key")
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from pippy.frontend.reduction import graph_reduction, model_reduction
from pippy.runtime.stage import StageError

__all__ = ["describe", "graph_reduction", "infer_reduction", "loss_index", "model_reduction", "step_loss"]


def step_loss(where: str, mb: int, out: Any, loss_fn: Callable[..., torch.Tensor] | None, target: Any, has_target: bool,
              check_finite: bool = False) -> torch.Tensor:
    """The unscaled scalar loss of micro-batch ``mb`` from the last stage's output, or a clear error.

    ``where`` names rank, stage, micro-batch and action for messages. With ``loss_fn`` it is
    ``loss_fn(out, target)``; without, the model's own output must be a scalar or carry a
    ``loss`` field. ``check_finite`` raises on NaN or infinity (one host sync).

        >>> out = torch.ones(2, 3, requires_grad=True)
        >>> step_loss("rank 1, stage 1", 0, out, torch.nn.functional.mse_loss, torch.zeros(2, 3), True)
        tensor(1., grad_fn=<ViewBackward0>)
        >>> step_loss("rank 1, stage 1", 0, {"logits": out}, None, None, False)
        Traceback (most recent call last):
        ...
        pippy.runtime.stage.StageError: rank 1, stage 1: step() needs a scalar loss: ... got dict with keys ['logits'] and no 'loss' key
    """
    if loss_fn is not None:
        if not has_target:
            raise StageError(f"{where}: loss_fn is set but no target was given; call step(..., target=y) here")
        try:
            loss = loss_fn(out, target)
        except Exception as exc:  # the user's function: say where, with what, and what it must accept
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            arity = isinstance(exc, TypeError) and "positional argument" in first
            fix = (
                "loss_fn must accept two positional arguments, def loss_fn(output, target)"
                if arity
                else "make step(target=...) match the model's output (batch size along the split dim, dtype, "
                "structure: a tensor where loss_fn expects one, not a list), or pass target_chunk_spec= to split it "
                "like the output"
            )
            raise StageError(
                f"{where}: loss_fn(output, target) raised {type(exc).__name__}: {first}. It got output "
                f"{describe(out)}, target {describe(target)} (this micro-batch's slice of step(target=...)). "
                f"How to fix: {fix}"
            ) from exc
    else:
        loss = _loss_from_output(out)
        if loss is None:
            raise StageError(
                f"{where}: step() needs a scalar loss: pass loss_fn=... to the schedule, or make the model "
                f"return a 0-dim tensor (or an output with a 'loss' field); got {describe(out)}"
            )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise StageError(
            f"{where}: loss_fn must return a scalar tensor, got {describe(loss)}; reduce it (reduction='mean' or 'sum')"
        )
    if not loss.requires_grad and not torch.is_grad_enabled():
        raise StageError(
            f"{where}: step() runs under torch.no_grad() (or inference_mode), so the loss has no gradient to "
            "backpropagate. Call step() outside it, or use the schedule's .eval(...) for a forward-only pass"
        )
    if not loss.requires_grad:
        raise StageError(
            f"{where}: the loss does not require grad, so there is nothing to backpropagate; check that "
            "loss_fn uses the model output (not a detached copy) and that the last stage has trainable inputs"
        )
    if check_finite and not bool(torch.isfinite(loss.detach()).all()):
        raise StageError(
            f"{where}: the loss of micro-batch {mb} is {loss.item()}; expected a finite number. Lower the "
            "learning rate, clip gradients or check this micro-batch's data (check_finite=True raised this)"
        )
    return loss.reshape(())


def describe(x: Any) -> str:
    """A value, briefly, for messages: ``float64[2, 4]``, ``dict with keys ['logits'] and no 'loss' key``, ``tuple of 2: [...]``."""
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
    if isinstance(x, Mapping):
        keys = list(x)
        extra = "" if "loss" in keys else " and no 'loss' key"
        return f"{type(x).__name__} with keys {keys[:8]}{extra}"
    if isinstance(x, list | tuple):
        inner = ", ".join(describe(v) for v in x[:4]) + (", ..." if len(x) > 4 else "")
        return f"{type(x).__name__} of {len(x)}: [{inner}]"
    return type(x).__name__


def _loss_from_output(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor) and out.dim() == 0:
        return out
    loss = out.get("loss") if hasattr(out, "get") else getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def infer_reduction(loss_fn: Callable[..., Any] | None) -> str | None:
    """How ``loss_fn`` reduces a batch, when it says so: ``"sum"``, ``"mean"``, or None when it cannot tell.

    Read from a ``reduction`` attribute (``nn.MSELoss(reduction="sum")``), a ``functools.partial``
    keyword, or the default of a ``reduction=`` parameter (``torch.nn.functional.mse_loss``).

        >>> infer_reduction(torch.nn.MSELoss(reduction="sum")), infer_reduction(torch.nn.functional.cross_entropy)
        ('sum', 'mean')
        >>> infer_reduction(lambda out, y: (out - y).pow(2).sum()) is None
        True
    """
    if loss_fn is None:
        return None
    found: Any = getattr(loss_fn, "reduction", None)
    if found is None and isinstance(loss_fn, functools.partial):
        found = loss_fn.keywords.get("reduction", infer_reduction(loss_fn.func))
    if found is None:
        try:
            param = inspect.signature(loss_fn).parameters.get("reduction")
        except (TypeError, ValueError):
            param = None
        if param is not None and param.default is not inspect.Parameter.empty:
            found = param.default
    return found if found in ("sum", "mean") else None


def loss_index(out_spec: pytree.TreeSpec, out_meta: Sequence[Any]) -> int | None:
    """The flat index of the model's own loss among its outputs: the output itself when it is a scalar, or its
    ``loss`` field (a scalar or all-ones shape); None when it has none. ``out_meta`` holds one entry per flat
    output with a ``shape`` (None for a constant).

        >>> from types import SimpleNamespace as M
        >>> spec = pytree.tree_flatten({"loss": 0, "logits": 0})[1]
        >>> loss_index(spec, [M(shape=()), M(shape=(2, 3))]), loss_index(spec, [M(shape=None), M(shape=(2,))])
        (0, None)
    """
    try:
        out = pytree.tree_unflatten(list(range(len(out_meta))), out_spec)
    except Exception:  # an output structure that cannot be rebuilt from indices: no loss to find
        return None
    field = not isinstance(out, int)
    if field:
        out = out.get("loss") if hasattr(out, "get") else getattr(out, "loss", None)
    if not isinstance(out, int) or not 0 <= out < len(out_meta):
        return None
    shape = out_meta[out].shape
    return out if shape is not None and (len(shape) == 0 or (field and all(d == 1 for d in shape))) else None

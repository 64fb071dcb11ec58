"""The loss of a pipeline step: the user's loss_fn (or the model's own loss) on the last stage, with clear errors.

    >>> import torch
    >>> describe(torch.zeros(2, 3, dtype=torch.float64)), describe({"logits": 1})
    ('float64[2, 3]', "dict with keys ['logits'] and no 'loss' key")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from pippy.runtime.stage import StageError

__all__ = ["describe", "step_loss"]


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
            fix = (
                "loss_fn must accept two positional arguments, def loss_fn(output, target)"
                if isinstance(exc, TypeError)
                else "make step(target=...) match the model's output (batch size along the split dim, dtype, "
                "structure), or pass target_chunk_spec= to split it like the output"
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

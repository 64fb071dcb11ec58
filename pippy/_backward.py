"""PiPPy's stage-level backward helpers (``stage_backward``, ``_null_coalesce_accumulate``).

    >>> import torch
    >>> x = torch.ones(2, requires_grad=True)
    >>> stage_backward((x * 3).sum(), None, (x,))[0].tolist()
    [3.0, 3.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["_null_coalesce_accumulate", "stage_backward"]


def _null_coalesce_accumulate(lhs: Any, rhs: Any) -> Any:
    """``lhs + rhs`` where a None side counts as zero (gradient accumulation).

        >>> _null_coalesce_accumulate(None, 2), _null_coalesce_accumulate(1, None), _null_coalesce_accumulate(1, 2)
        (2, 1, 3)
    """
    if lhs is None:
        return rhs
    if rhs is None:
        return lhs
    return torch.add(lhs, rhs) if isinstance(lhs, torch.Tensor) else lhs + rhs


def stage_backward(
    stage_output: Any,
    output_grads: Any,
    input_values: Sequence[Any],
    outputs_with_grads_idxs: Sequence[int] | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Backpropagate one stage: ``output_grads`` into ``stage_output``; return the inputs' gradients.

    ``stage_output`` and ``output_grads`` are matching pytrees (``output_grads`` None for a scalar
    loss). Parameter gradients accumulate into ``.grad`` as in ``loss.backward()``; the returned
    tuple has one entry per ``input_values`` item (None where it needs no gradient).
    ``outputs_with_grads_idxs`` keeps only those positions of a tuple/list ``stage_output``.

        >>> lin = torch.nn.Linear(2, 1)
        >>> x = torch.ones(3, 2, requires_grad=True)
        >>> gx, = stage_backward(lin(x), torch.ones(3, 1), [x])
        >>> torch.equal(gx, lin.weight.detach().expand(3, 2)), lin.weight.grad.tolist()
        (True, [[3.0, 3.0]])
    """
    if outputs_with_grads_idxs is not None:
        stage_output = [stage_output[i] for i in outputs_with_grads_idxs]
        if output_grads is not None:
            output_grads = [output_grads[i] for i in outputs_with_grads_idxs]
    outs = pytree.tree_leaves(stage_output)
    grads = [None] * len(outs) if output_grads is None else pytree.tree_leaves(output_grads)
    if len(grads) != len(outs):
        raise ValueError(
            f"stage_backward: the stage output has {len(outs)} tensors but output_grads has {len(grads)}; "
            "pass one gradient per output tensor, in the same structure (None for a scalar loss)"
        )
    roots, root_grads = [], []
    for out, g in zip(outs, grads):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            if g is None and out.numel() != 1:
                raise ValueError(
                    f"stage_backward: an output of shape {tuple(out.shape)} has no gradient; only a one-element "
                    "output (the loss) may go without one. Pass its gradient in output_grads."
                )
            roots.append(out)
            root_grads.append(g)
    inputs = [v for v in input_values if isinstance(v, torch.Tensor) and v.requires_grad]
    for v in inputs:
        if not v.is_leaf:
            v.retain_grad()
    if roots:
        torch.autograd.backward(roots, grad_tensors=root_grads)
    return tuple(v.grad if isinstance(v, torch.Tensor) and v.requires_grad else None for v in input_values)

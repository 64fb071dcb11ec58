"""Trace in the dtype the stages compute in (FSDP2 mixed precision), while the stages keep the model's own tensors.

A traced graph fixes the dtypes it saw: HF's ``hidden.to(input_dtype)`` becomes a cast to
float32 when traced in float32. Under FSDP2's ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``
the parameters are bfloat16 while a stage runs, so the graph must be traced in bfloat16: pippy
traces a copy of the model cast to ``compute_dtype`` and then gives every stage the original
(e.g. float32) parameters by FQN; buffers stay as traced, in ``compute_dtype``. Activations and their gradients then travel between stages in
bfloat16, the dtype the stages compute in.

    >>> import torch
    >>> from pippy import pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> pipe = pipeline(net, 1, (torch.randn(2, 4),), compute_dtype=torch.bfloat16)
    >>> pipe.stage_infos[0].module.get_parameter("0.weight") is net[0].weight    # the float32 master weight
    True
    >>> pipe.stage_infos[0].outputs[0].dtype                                     # what the stage computes
    torch.bfloat16
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

__all__ = ["autocast_state", "cast_example", "compute_copy", "restore_tensors"]


def autocast_state() -> tuple[str, str] | None:
    """``(device type, dtype)`` of the ``torch.autocast`` in force here, or None.

    A pipe traced under autocast records the dtypes autocast produces (bfloat16 logits), so it
    must run under the same autocast, and a pipe traced without it must run without it.

        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_state()
        ('cpu', 'torch.bfloat16')
        >>> autocast_state() is None
        True
    """
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            return device, str(torch.get_autocast_dtype(device))
    return None


def compute_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of ``module`` with floating parameters and buffers in ``dtype`` (what the trace sees)."""
    if not dtype.is_floating_point:
        raise ValueError(f"compute_dtype must be a floating dtype such as torch.bfloat16, got {dtype}")
    return copy.deepcopy(module).to(dtype)


def cast_example(tree: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of an example input in ``dtype``; everything else as is."""
    return pytree.tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree)


def restore_tensors(stage_modules: list[fx.GraphModule], model: nn.Module) -> None:
    """Point each stage module's parameters back at ``model``'s own (master) parameters, by FQN.

    Buffers stay in the compute dtype, as traced: FSDP2 casts parameters, not buffers, and the
    graph checks the dtype of every buffer it reads (a rotary ``inv_freq`` in bfloat16).
    """
    originals = dict(model.named_parameters(remove_duplicate=False))
    for mod in stage_modules:
        for prefix, owner in mod.named_modules(remove_duplicate=False):
            pre = f"{prefix}." if prefix else ""
            for name in list(owner._parameters):
                orig = originals.get(pre + name)
                if orig is not None:
                    owner._parameters[name] = orig

"""torch.compile's wrapper module (``OptimizedModule``): told apart by its type, and taken off a model before tracing.

``torch.compile(model)`` returns a wrapper whose one child, ``_orig_mod``, is the model; its
``state_dict`` keys carry ``_orig_mod.``. pippy traces the model itself (torch.export does not run
the compiled code anyway), so stages keep the model's own names, as torch's distributed
checkpoint (``get_model_state_dict``) does for a compiled model.

    >>> import torch
    >>> net = torch.nn.Linear(2, 2)
    >>> uncompiled(net, "pipeline()") is net, compiled_inner(net) is None
    (True, True)
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TypeVar

from torch import nn

from pippy.frontend.notice import warn_user

__all__ = ["PREFIX", "compiled_inner", "strip_prefix", "uncompiled"]

PREFIX = "_orig_mod."  # what torch.compile's wrapper puts before the model's own names
_COMPILE_STAGES = (" To compile, compile the stages after build_stage instead: stage.submod.compile(), or its blocks "
                   "(stage.submod.get_submodule(name).compile())")
V = TypeVar("V")


def compiled_inner(module: Any) -> nn.Module | None:
    """The module inside ``module`` when it is a ``torch.compile`` wrapper (``OptimizedModule``), else None.

    By type, not by a child's name: a model may call one of its own modules ``_orig_mod``. No wrapper
    exists before torch._dynamo is imported, so this never imports it.
    """
    frame = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(frame, "OptimizedModule", None)
    if wrapper is None or not isinstance(module, wrapper):
        return None
    inner = module._modules.get("_orig_mod")
    return inner if isinstance(inner, nn.Module) else None


def uncompiled(module: nn.Module, where: str | None = None, hint: str = _COMPILE_STAGES) -> nn.Module:
    """``module`` without its ``torch.compile`` wrappers (however nested). Given ``where`` (the entry point, for the
    message), warns that the stages made from it run eagerly, and ``hint`` how to compile them."""
    inner, found = module, compiled_inner(module)
    while found is not None:
        inner, found = found, compiled_inner(found)
    if inner is not module and where is not None:
        name = next((n for n, _ in inner.named_parameters()), "a.weight")
        warn_user(
            f"{where}: the model is a torch.compile wrapper (OptimizedModule); pippy uses the model inside it "
            f"(model._orig_mod, the model you compiled), so its stages run eagerly and keep that model's names "
            f"('{name}', not '{PREFIX}{name}': stage.state_dict() and pippy.checkpoint load into the uncompiled "
            f"model, as torch's get_model_state_dict gives them).{hint}"
        )
    return inner


def strip_prefix(names: Mapping[str, V] | None) -> dict[str, V] | None:
    """``names`` (a ``split_spec``) keyed without torch.compile's ``_orig_mod.`` prefix.

        >>> strip_prefix({"_orig_mod.layers.1": 1, "head": 2})
        {'layers.1': 1, 'head': 2}
    """
    if names is None:
        return None
    out = {}
    for k, v in names.items():
        while k.startswith(PREFIX):
            k = k[len(PREFIX):]
        out[k] = v
    return out

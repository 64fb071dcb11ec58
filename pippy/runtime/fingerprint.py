"""A fingerprint of a pipe's stages (graph code, parameter names, shapes and dtypes) that ranks compare before a run.

Ranks that traced different model code (``relu`` on one, ``tanh`` on another) with the same
parameter names would otherwise train without an error. Each stage's hash covers the sequence of
operators its traced graph calls and its parameters' names, shapes and dtypes. Arguments are left
out, and so are the operators that only copy or re-lay out a tensor (``contiguous``, ``clone``,
``_to_copy``, ...) or check it, since those depend on the device traced on (a meta-device trace
keeps a ``contiguous`` that a CPU trace drops); attention kernels count as one operator whatever
the device picked. It is computed once per pipe (again only when a stage's module or code was
replaced since). A hand-cut pipe (``ManualPipelineStage``, ``PipelineStage`` around the user's own
module) has no graph to compare: its fingerprint is ``"hand-cut"``.

    >>> import torch
    >>> from pippy import pipeline
    >>> pipe = pipeline(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()), 1, (torch.ones(4, 2),))
    >>> stage_fingerprints(pipe)
    ['stage 0: ...']
    >>> other = pipeline(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()), 1, (torch.ones(4, 2),))
    >>> stage_fingerprints(other) == stage_fingerprints(pipe)
    False
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

__all__ = ["CODE_FACT", "normalized_code", "stage_fingerprints"]

CODE_FACT = ("stage code (a hash of the operators each stage's traced graph calls and its parameters' names, shapes "
             "and dtypes; "
             "ranks that traced different model code differ here: run the same model source, version and "
             "pipeline() options on every rank)")

_CALL = re.compile(r"torch\.ops\.(\w+)\.(\w+)|self\.([\w.]+)\(")
_LAYOUT = {"contiguous", "clone", "_to_copy", "to", "alias", "detach", "lift_fresh_copy", "_assert_tensor_metadata",
           "_assert_scalar", "sym_constrain_range_for_size", "empty_strided", "copy", "copy_", "as_strided"}


def normalized_code(code: str) -> str:
    r"""The operators ``code`` calls, in order, without arguments, layout-only copies, checks and device choices.

        >>> normalized_code("y = torch.ops.aten.relu.default(x)\nz = torch.ops.aten.contiguous.default(y)")
        'aten.relu'
        >>> a = "o = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v)"
        >>> normalized_code(a) == normalized_code(a.replace("flash_attention_for_cpu", "efficient_attention"))
        True
    """
    out = []
    for ns, op, module in _CALL.findall(code):
        if module:
            out.append(f"self.{module}")
        elif op not in _LAYOUT:
            out.append("attention" if "dot_product" in op or op.endswith("_attention") else f"{ns}.{op}")
    return " ".join(out)


def stage_fingerprints(pipe: Any) -> list[str] | str:
    """One ``"stage i: <hash>"`` per stage of ``pipe``, or ``"hand-cut"`` for a pipe without a graph."""
    if getattr(pipe, "manual", False):
        return "hand-cut"
    key = tuple((id(info.module), id(getattr(info.module, "code", None))) for info in pipe.stage_infos)
    cached = getattr(pipe, "_pippy_fingerprints", None)
    if cached is not None and cached[0] == key:
        return list(cached[1])
    out = []
    for i, info in enumerate(pipe.stage_infos):
        module = info.module
        code = getattr(module, "code", None)
        text = normalized_code(code) if isinstance(code, str) else type(module).__qualname__
        params = "; ".join(f"{n} {tuple(p.shape)} {p.dtype}" for n, p in module.named_parameters())
        out.append(f"stage {i}: {hashlib.sha1((text + chr(10) + params).encode()).hexdigest()[:12]}")
    try:
        pipe._pippy_fingerprints = (key, out)
    except AttributeError:  # a pipe class with slots: computed again at the next agreement (still not per step)
        pass
    return list(out)

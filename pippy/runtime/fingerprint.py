"""A fingerprint of a pipe's stages (graph code, parameter names, shapes and dtypes) that ranks compare before a run.

Ranks that traced different model code (``relu`` on one, ``tanh`` on another) with the same
parameter names would otherwise train without an error. Each stage's hash covers its traced
graph code and its parameters, with device literals (``cuda:0`` against ``cuda:1`` or ``cpu``) and
comment lines left out, so ranks that traced on different devices agree. It is computed once per
pipe (again only when a stage's module or code was replaced since). A hand-cut pipe (``ManualPipelineStage``, ``PipelineStage`` around the user's own module) has
no graph to compare: its fingerprint is ``"hand-cut"``.

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

CODE_FACT = ("stage code (a hash of each stage's traced graph code and its parameters' names, shapes and dtypes; "
             "ranks that traced different model code differ here: run the same model source, version and "
             "pipeline() options on every rank)")

_DEVICE = re.compile(r"device\(type='[^']*'(?:, index=\d+)?\)|'(?:cuda|cpu|meta|xpu|mps|hpu|npu)(?::\d+)?'")


def normalized_code(code: str) -> str:
    r"""``code`` without comment lines, blank lines and device literals (so that placement does not count).

        >>> normalized_code("x = ones(2, device = device(type='cuda', index=1))\n    # File: a.py:3\n")
        'x = ones(2, device = <device>)'
        >>> normalized_code("y = x.to('cuda:0')") == normalized_code("y = x.to('cpu')")
        True
    """
    lines = [ln.rstrip() for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return _DEVICE.sub("<device>", "\n".join(lines))


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

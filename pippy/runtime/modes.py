"""Train / eval mode: a traced stage graph keeps the mode it was traced in; say so when a stage's module differs.

``torch.export`` writes the module's mode into the graph: ``dropout(x, p, train=True)`` and
``batch_norm(..., training=True, ...)`` (plus the ``num_batches_tracked`` update) stay as traced,
whatever ``.train()`` / ``.eval()`` says later. A stage whose graph has such ops and whose module's
``training`` flag no longer matches the trace gets one warning per schedule, naming the ops and the
fix (trace a pipe from the model in the mode you want, e.g. ``pipeline(model.eval(), ...)`` for
evaluation).

    >>> import torch
    >>> from pippy import pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    >>> gm = pipeline(net, 1, (torch.ones(2, 2),)).get_stage_module(0)
    >>> mode_ops(gm)
    ['dropout']
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import fx

__all__ = ["mode_ops", "warn_if_mode_changed"]

_WORDS = ("dropout", "batch_norm", "instance_norm", "rrelu")
_SDPA = "scaled_dot_product_attention"


def mode_ops(gm: fx.GraphModule) -> list[str]:
    """Names of the nodes of ``gm`` whose result depends on the train / eval mode it was traced in
    (attention counts when it was traced with a dropout probability)."""
    out = []
    for n in gm.graph.nodes:
        name = str(n.target) if n.op == "call_function" else ""
        if any(w in name for w in _WORDS):
            out.append(n.name)
        elif _SDPA in name:
            p = n.kwargs.get("dropout_p", n.args[4] if len(n.args) > 4 else 0.0)
            if isinstance(p, int | float) and p > 0:
                out.append(n.name)
    return out


def warn_if_mode_changed(stages: Sequence[Any], traced_training: bool | None, where: str, warned: set[int]) -> None:
    """Warn about stages whose module mode differs from the trace's; ``warned`` keeps the stages already looked at."""
    if traced_training is None:
        return
    for st in stages:
        if st.index in warned or st.submod.training == traced_training:
            continue
        warned.add(st.index)  # looked at once: a graph without such ops never needs a look again
        gm = st.info.module  # the pipe's flat stage graph (also right under a DDP / FSDP wrapper)
        ops = mode_ops(gm) if isinstance(gm, fx.GraphModule) else []
        if not ops:
            continue
        traced, now = ("train", "eval") if traced_training else ("eval", "train")
        warnings.warn(
            f"{where}, stage {st.index}: the pipe was traced in {traced} mode and this stage's module is now in {now} "
            f"mode, which a traced graph does not follow: {', '.join(ops[:4])}{' ...' if len(ops) > 4 else ''} still "
            f"run{'s' if len(ops) == 1 else ''} as in {traced} mode. Trace a pipe from the model in {now} mode for "
            f"this (e.g. pipeline(model.{now}(), ...))",
            stacklevel=4,
        )

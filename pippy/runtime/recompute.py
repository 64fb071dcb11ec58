"""Activation recompute per stage: keep only a stage's inputs (or only what elementwise chains need) in forward.

    >>> import torch
    >>> lin = torch.nn.Linear(2, 2)
    >>> x = torch.ones(1, 2)
    >>> plain = lin(x)
    >>> enable_recompute(lin)
    []
    >>> torch.equal(lin(x), plain), is_recomputing(lin)
    (True, True)
    >>> disable_recompute(lin); is_recomputing(lin)
    False
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch.utils.checkpoint
from torch import fx, nn

from pippy.frontend.materialize import HoldsModule
from pippy.frontend.pointwise import Region, is_pointwise, recompute_pointwise, restore_pointwise
from pippy.runtime.stage import Stage

__all__ = ["disable_recompute", "enable_recompute", "is_recomputing"]

_ORIG = "_pippy_forward_without_recompute"


def _module(stage: HoldsModule | nn.Module) -> nn.Module:
    return stage.submod if isinstance(stage, HoldsModule) else stage


def enable_recompute(stage: HoldsModule | nn.Module, policy: Literal["full", "pointwise"] = "full") -> list[Region]:
    """Recompute a stage's activations in backward instead of keeping them: same numbers, less memory.

    ``policy="full"`` runs the stage's module (or any module) under non-reentrant
    ``torch.utils.checkpoint``: only its inputs are kept, and backward runs the whole forward
    again. ``policy="pointwise"`` rewrites the traced stage's graphs so that each chain of
    elementwise ops (an activation function, a norm's scaling, a residual cast) keeps only its
    inputs and runs again in backward (:mod:`pippy.frontend.pointwise`): matmuls and attention
    are not recomputed, so it costs a fraction of ``"full"`` and saves less. It returns the
    regions rewritten (an empty list for ``"full"``).

    Parameter names, ``state_dict`` and gradients are unchanged; float64 results equal running
    without recompute. ``"full"`` applies to full backward (B): a split-backward schedule (I/W)
    runs the stage's tapped copy and stores activations as before. ``"pointwise"`` applies to both.

        >>> lin = torch.nn.Linear(2, 2)
        >>> enable_recompute(lin), lin(torch.ones(1, 2)).shape
        ([], torch.Size([1, 2]))
    """
    mod = _module(stage)
    if policy == "pointwise":
        if isinstance(stage, Stage):
            stage.pointwise_recompute = True
        return recompute_pointwise(mod)
    if policy != "full":
        raise ValueError(f"enable_recompute: policy must be 'full' or 'pointwise', got {policy!r}")
    if _ORIG in mod.__dict__:
        return []
    inner = mod.forward
    mod.__dict__[_ORIG] = inner
    stats = _norm_statistics(mod)  # what a norm updates in forward; its backward never reads them in train mode

    def contexts() -> tuple[Any, Any]:
        return contextlib.nullcontext(), _KeepBuffers(mod, stats)

    def forward(*args: Any) -> Any:
        if not torch.is_grad_enabled():
            return inner(*args)
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, context_fn=contexts)

    mod.forward = forward  # type: ignore[method-assign]
    return []


def _norm_statistics(mod: nn.Module) -> set[str]:
    """The buffers of ``mod`` that a norm in it may update: ``running_mean`` / ``running_var`` / the batch count of
    norm modules, and the buffers a traced graph passes to a ``*_norm`` op."""
    buffers = {n for n, _ in mod.named_buffers()}
    names: set[str] = set()
    for prefix, sub in mod.named_modules():
        pre = f"{prefix}." if prefix else ""
        if isinstance(sub, nn.modules.batchnorm._NormBase):
            names.update(pre + n for n in ("running_mean", "running_var", "num_batches_tracked"))
        graph = getattr(sub, "graph", None)  # a GraphModule, or export's InterpreterModule
        if isinstance(graph, fx.Graph):
            for node in graph.nodes:
                if node.op == "call_function" and "norm" in str(node.target):
                    names.update(pre + str(a.target) for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr")
    names.update(b for b in buffers if b.rsplit(".", 1)[-1] == "num_batches_tracked")  # a traced norm's count
    return names & buffers


class _KeepBuffers:
    """Around the recompute in backward: put back the norms' running statistics, so that they move once per forward,
    not again when backward runs it a second time. Only a value that changed is written back (in eval mode the
    recompute saved the statistics themselves for backward, and a write would bump their version)."""

    def __init__(self, mod: nn.Module, written: set[str]) -> None:
        self.mod, self.written = mod, written
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self) -> None:
        bufs = dict(self.mod.named_buffers())
        self.saved = {n: bufs[n].detach().clone() for n in self.written if n in bufs}

    def __exit__(self, *exc: object) -> None:
        bufs = dict(self.mod.named_buffers())
        with torch.no_grad():
            for n, value in self.saved.items():
                if not torch.equal(bufs[n], value):
                    bufs[n].copy_(value)


def disable_recompute(stage: HoldsModule | nn.Module) -> None:
    """Undo :func:`enable_recompute`.

        >>> lin = torch.nn.Linear(2, 2); _ = enable_recompute(lin); disable_recompute(lin)
        >>> is_recomputing(lin)
        False
    """
    mod = _module(stage)
    if isinstance(stage, Stage):
        stage.pointwise_recompute = False
    restore_pointwise(mod)
    if _ORIG in mod.__dict__:
        mod.__dict__.pop(_ORIG)
        mod.__dict__.pop("forward", None)


def is_recomputing(stage: HoldsModule | nn.Module) -> bool:
    """Whether :func:`enable_recompute` is in force on this stage (or module).

        >>> is_recomputing(torch.nn.Linear(1, 1))
        False
    """
    return any(_ORIG in m.__dict__ or is_pointwise(m) for m in _module(stage).modules())

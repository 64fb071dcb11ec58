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
from typing import Any, Literal, cast

import torch.utils.checkpoint
from torch import fx, nn
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm

from pippy.frontend.batchwarnings import written_buffers
from pippy.frontend.materialize import HoldsModule
from pippy.frontend.mutation import value_read
from pippy.frontend.pointwise import Region, is_pointwise, recompute_pointwise, restore_pointwise
from pippy.runtime.stage import Stage

__all__ = ["disable_recompute", "enable_recompute", "is_recomputing"]

RECOMPUTED_MARK = "_pippy_forward_without_recompute"  # a module whose forward recomputes keeps its own here


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
    if RECOMPUTED_MARK in mod.__dict__:
        return []
    inner = mod.forward
    mod.__dict__[RECOMPUTED_MARK] = inner
    stats = _norm_statistics(mod)  # where a norm may update buffers in forward
    others = _read_and_written(mod, stats)

    def forward(*args: Any) -> Any:
        if not torch.is_grad_enabled():
            return inner(*args)
        bufs = dict(mod.named_buffers()) if others else {}
        seen = {n: bufs[n].detach().clone() for n in others if n in bufs}  # what this forward reads

        def contexts() -> tuple[Any, Any]:
            return contextlib.nullcontext(), _KeepBuffers(mod, stats, seen)

        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, context_fn=contexts)

    mod.forward = forward  # type: ignore[method-assign]
    return []


# aten norms that write running statistics (args 3 and 4) when the flag at this index is true (True: always)
_STAT_WRITERS: dict[str, int | bool] = {
    "batch_norm": 5, "native_batch_norm": 5, "_native_batch_norm_legit": 5, "cudnn_batch_norm": 5,
    "miopen_batch_norm": 5, "_batch_norm_impl_index": 5, "instance_norm": 5, "_batch_norm_with_update": True,
}
_FLAG_NAMES = ("training", "use_input_stats", "train")


def _norm_statistics(mod: nn.Module) -> list[tuple[Any, list[str]]]:
    """Where ``mod``'s norms may update buffers in forward: (norm module or traced node, buffer names) pairs, the
    ``running_mean`` / ``running_var`` / batch count of norm modules and the statistics a traced norm op is passed
    (its count: a traced ``num_batches_tracked += n``). :func:`_writes` says whether one writes in its current mode."""
    buffers = {n for n, _ in mod.named_buffers()}
    out: list[tuple[Any, list[str]]] = []
    for prefix, sub in mod.named_modules():
        pre = f"{prefix}." if prefix else ""
        if isinstance(sub, nn.modules.batchnorm._NormBase):
            out.append((sub, [pre + n for n in ("running_mean", "running_var", "num_batches_tracked")]))
        graph = getattr(sub, "graph", None)  # a GraphModule, or export's InterpreterModule
        if isinstance(graph, fx.Graph):
            for node in graph.nodes:
                op = str(node.target).split(".")[1] if str(node.target).startswith("aten.") else ""
                args = node.args[3:5] if op in _STAT_WRITERS else node.args[:1] if op == "add_" else ()
                names = [pre + str(a.target) for a in args if isinstance(a, fx.Node) and a.op == "get_attr"]
                if op == "add_":
                    names = [n for n in names if n.rsplit(".", 1)[-1] == "num_batches_tracked"]
                if names:
                    out.append((node, names))
    return [(src, [n for n in names if n in buffers]) for src, names in out if any(n in buffers for n in names)]


def _writes(src: Any) -> bool:
    """Whether a norm module or traced op from :func:`_norm_statistics` writes its statistics now (its current mode;
    a traced graph's mode constants follow the modules, ``pippy.frontend.trainmode``), known without reading values."""
    if isinstance(src, nn.Module):
        return bool(src.training and src.track_running_stats)  # type: ignore[attr-defined]
    op = str(src.target).split(".")[1]
    if op == "add_":  # a count: ``+= 0`` in eval mode
        other = src.kwargs.get("other", src.args[1] if len(src.args) > 1 else 1)
        return not (isinstance(other, int | float) and other == 0)
    at = _STAT_WRITERS[op]
    if at is True:
        return True
    flag = next((src.kwargs[k] for k in _FLAG_NAMES if k in src.kwargs), src.args[at] if len(src.args) > at else True)
    return bool(flag)


def _read_and_written(mod: nn.Module, stats: list[tuple[Any, list[str]]]) -> list[str]:
    """The buffers that ``mod``'s forward writes and computes from, besides norm statistics (spectral norm's power
    iteration vectors, an EMA the forward then reads): a recompute must read them as its forward did, not as later
    micro-batches' forwards left them. Found in traced graphs (a buffer only written, like a queue or a counter
    nothing reads, is left out: no copy is kept) and, in eager modules, spectral norm's vectors."""
    norms = {n for _, names in stats for n in names}
    out: list[str] = []
    for prefix, sub in mod.named_modules():
        pre = f"{prefix}." if prefix else ""
        graph = getattr(sub, "graph", None)
        if isinstance(graph, fx.Graph):  # a GraphModule, or export's InterpreterModule
            written = set(written_buffers(cast(fx.GraphModule, sub)))
            out += [pre + str(n.target) for n in graph.nodes
                    if n.op == "get_attr" and n.target in written and value_read(n)]
        elif isinstance(sub, _SpectralNorm):
            out += [pre + "_u", pre + "_v"]
        else:
            out += [f"{pre}{h.name}_{v}" for h in sub._forward_pre_hooks.values() if isinstance(h, SpectralNorm)
                    for v in ("u", "v")]  # torch.nn.utils.spectral_norm (legacy)
    buffers = {n for n, _ in mod.named_buffers()}
    return sorted({n for n in out if n in buffers and n not in norms})


class _KeepBuffers:
    """Around the recompute in backward: put back the norms' running statistics, so that they move once per forward,
    not again when backward runs it a second time. Only the statistics the norms write in their current mode are
    saved and written back, decided from the modes, never from the values (reading a value would sync a GPU with its
    host per buffer and micro-batch): in eval mode the recompute saved the statistics themselves for backward, and a
    write would bump their version. Other buffers the forward writes (``seen``: their values when the micro-batch's
    forward ran) are set to those values for the recompute, and put back after it."""

    def __init__(self, mod: nn.Module, sources: list[tuple[Any, list[str]]],
                 seen: dict[str, torch.Tensor] | None = None) -> None:
        self.mod, self.sources, self.seen = mod, sources, seen or {}
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self) -> None:
        written = {n for src, names in self.sources if _writes(src) for n in names} | set(self.seen)
        bufs = dict(self.mod.named_buffers()) if written else {}
        self.saved = {n: bufs[n].detach().clone() for n in written if n in bufs}
        with torch.no_grad():
            for n, value in self.seen.items():
                bufs[n].copy_(value)

    def __exit__(self, *exc: object) -> None:
        bufs = dict(self.mod.named_buffers()) if self.saved else {}
        with torch.no_grad():
            for n, value in self.saved.items():
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
    if RECOMPUTED_MARK in mod.__dict__:
        mod.__dict__.pop(RECOMPUTED_MARK)
        mod.__dict__.pop("forward", None)


def is_recomputing(stage: HoldsModule | nn.Module) -> bool:
    """Whether :func:`enable_recompute` is in force on this stage (or module).

        >>> is_recomputing(torch.nn.Linear(1, 1))
        False
    """
    return any(RECOMPUTED_MARK in m.__dict__ or is_pointwise(m) for m in _module(stage).modules())

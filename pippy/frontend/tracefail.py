"""Why ``torch.export`` could not trace a model, and how to fix it: the text of :class:`PipeTraceError`.

A failed trace has a few usual causes, each with its own fix: example inputs on another device
than the model; a container torch's pytree does not know; shapes that disagree because an
unbatched input was split like the batch; data-dependent control flow; and inputs the model
cannot run on at all (an optional input it needs left at ``None``), which :func:`explain_trace_failure`
tells apart by running ``forward`` once eagerly, outside any trace.

    >>> from pippy import pipeline
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x, mask=None):
    ...         return x * mask[:, None]
    >>> try:
    ...     pipeline(Net(), 2, (torch.ones(4, 3),))
    ... except RuntimeError as exc:
    ...     msg = str(exc)
    >>> "Net fails on these inputs when run eagerly too" in msg, "Inputs forward leaves at None: mask;" in msg
    (True, True)
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["LIB_DIRS", "explain_trace_failure"]

_TAIL = "Full export error above (chained as __cause__)."


def explain_trace_failure(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], exc: BaseException,
                          cache_off: Sequence[str] = ()) -> str:
    """The message for ``torch.export`` failing on ``module(*args, **kwargs)`` with ``exc``: what failed, where in
    the user's code, the likely cause and how to fix it. ``cache_off`` names the submodules whose
    ``config.use_cache`` the trace switched off (and that are still off): the eager try-out runs as traced, and
    again as the user calls it where that fails, to tell a failing ``use_cache=False`` path from bad inputs.

        >>> msg = explain_trace_failure(torch.nn.Linear(2, 2), (torch.ones(1, 2),), {}, ValueError("boom"))
        >>> msg.splitlines()[0]
        'torch.export could not trace Linear: ValueError: boom'
    """
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = _user_frame(exc)
    at = f"\n  at {where}" if where else ""
    head = f"torch.export could not trace {type(module).__name__}: {type(exc).__name__}: {first}{at}\n"
    devices = _device_mismatch(module, args, kwargs)
    if devices:
        return f"{head}{devices} {_TAIL}"
    unknown = re.search(r"Found (<class '[^']+'>) in (output|input)", str(exc))
    unsupported = re.search(r"Unsupported (input) type (<class '[^']+'>)", str(exc))
    found = (unknown.group(1), unknown.group(2)) if unknown and "pytree" in str(exc) else \
        (unsupported.group(2), "input") if unsupported else None
    if found is not None:
        kind, side = found
        return (
            f"{head}The model's {side} holds a {kind}, a container torch's pytree does not know, so its tensors "
            f"cannot be traced. How to fix: register the class before pipeline(): "
            "torch.utils._pytree.register_dataclass(TheClass) for a dataclass, "
            f"torch.utils._pytree.register_pytree_node(...) otherwise; or {'return' if side == 'output' else 'pass'} a "
            f"tuple or dict instead. {_TAIL}"
        )
    nones = _none_hint(module, args, kwargs, exc, where or "")
    traced = _eager_error(module, args, kwargs)  # forward as the trace ran it
    if traced and cache_off:
        with _cache_as_called(module, cache_off):
            called = _eager_error(module, args, kwargs)
        if not called:
            return (f"{head}{type(module).__name__} runs eagerly on these inputs as you call it, but pippy traces it "
                    "with config.use_cache=False (a pipeline step runs whole sequences and keeps no key/value cache), "
                    "and its forward takes another path then, which fails eagerly too (it raised "
                    f"{traced}): the model's use_cache=False path is the problem, not the inputs.{nones} "
                    f"The trace failed on that path at the line above. {_kind_hint(exc)}How to fix: make forward run "
                    "on these inputs with use_cache=False (check model(..., use_cache=False) eagerly), then "
                    f"{_TRACEABLE} {_TAIL}")
        traced = called
    if traced:
        return (f"{head}{type(module).__name__} fails on these inputs when run eagerly too, outside any trace, so the "
                f"inputs are the problem, not the trace (eagerly it raised {traced}).{nones} How to fix: pass what "
                f"forward needs in example_args / example_kwargs (and at every step). {_TAIL}")
    shapes = _shape_fix(exc)
    if shapes:
        return f"{head}{shapes}{_TAIL}"
    if nones:
        return (f"{head}Forward runs eagerly on these inputs, but not under the trace, which may take another path "
                f"(Hugging Face models build their masks differently while traced).{nones} How to fix: pass those "
                f"inputs in example_args / example_kwargs (and at every step). {_TAIL}")
    known = _known_fix(module, exc, where or "")
    if known:
        return f"{head}{known} {_TAIL}"
    return f"{head}{_kind_hint(exc)}How to fix: {_TRACEABLE} {_TAIL}"


def _known_fix(module: nn.Module, exc: BaseException, where: str) -> str:
    """Cause and fix of a failure whose construct is known: a module converted in forward (its parameters swapped),
    or a Hugging Face mixture-of-experts loop over the experts hit; '' otherwise."""
    if "Couldn't swap" in str(exc) and "_apply()" in str(exc):
        routers = sorted({type(m).__name__ for m in module.modules() if type(m).__name__.endswith("Router")})
        dtypes = (getattr(getattr(m, "config", None), "router_dtype", None) for m in module.modules())
        router = next((d for d in dtypes if isinstance(d, str)), None)
        return (
            "forward changes a module's parameters: it converts a module (module.to(dtype) / .half() / .float() "
            "inside forward, as in the line above), which swaps the module's parameters for new ones; torch.export "
            "cannot swap the parameters it traces, even where the conversion changes nothing. This is not "
            "data-dependent control flow. How to fix: convert the module once, before pipeline(), and take the "
            "conversion out of forward."
            + (f" Here the routers ({', '.join(routers)}) cast their classifier to config.router_dtype ({router!r}) "
               "in every forward, whatever the dtypes, so no router_dtype helps: the router's forward itself must "
               "change (the model cannot be traced as it is)." if router and routers else ""))
    frame = re.match(r"(.+?):\d+ in ", where)
    if not frame or not re.search(r"\bin expert_hit\b", where):
        return ""
    try:
        with open(frame.group(1), encoding="utf-8") as src:
            switchable = "use_experts_implementation" in src.read()  # its experts class takes experts_implementation
    except OSError:
        switchable = False
    loop = ("The failing line is a Hugging Face mixture-of-experts loop over the experts its tokens were routed to "
            "(`for expert_idx in expert_hit`): how many there are depends on the data, which a trace cannot record.")
    if not switchable:
        return (f"{loop} This model's experts take no experts_implementation (transformers' loop-free "
                f"\"batched_mm\"), so its forward must change. How to fix: {_TRACEABLE}")
    return (f"{loop} How to fix: run the experts as batched matrix products, with no such loop: "
            "experts_implementation=\"batched_mm\" in the config (XConfig(..., experts_implementation=\"batched_mm\"), "
            "from_pretrained(..., experts_implementation=\"batched_mm\")), or model.set_experts_implementation("
            "\"batched_mm\") before pipeline(); it computes the same.")


_TRACEABLE = (
    "make forward traceable (no data-dependent Python control flow on tensor values, no .item()/.tolist() driving "
    "branches, no untraceable side effects). Common fixes: move the data-dependent part outside the model, replace `if x.sum() > 0:` with "
    "torch.where or torch.cond, pass configuration as Python values (module attributes, not tensors). The whole model "
    "is traced at once, so every part of forward must be traceable, whichever stage it lands in."
)


@contextlib.contextmanager
def _cache_as_called(module: nn.Module, cache_off: Sequence[str]) -> Iterator[None]:
    """Within the block, the ``config.use_cache`` the trace switched off (submodules ``cache_off``) is on again."""
    configs = [module.get_submodule(name).config for name in cache_off]
    for cfg in configs:
        cfg.use_cache = True
    try:
        yield
    finally:
        for cfg in configs:
            cfg.use_cache = False


def _eager_error(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """What ``forward`` raises run eagerly on the same inputs (no grad; buffers and the RNG restored after), as
    ``Type: first line``; '' when it runs (the trace is the problem) or when it cannot be tried (meta tensors)."""
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.is_meta for t in tensors) or any(
            isinstance(t, torch.Tensor) and t.is_meta for t in pytree.tree_leaves((args, kwargs))):
        return ""
    saved = [(b, b.detach().clone()) for b in module.buffers()]  # forward may update running statistics
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            module(*args, **kwargs)
    except Exception as eager:  # any failure of the user's forward; it is reported, not raised
        error = f"{type(eager).__name__}: {(str(eager).strip().splitlines() or [''])[0]}"
    else:
        return ""
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
    return error


def _none_hint(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], exc: BaseException, line: str) -> str:
    """For an error about a None (``'NoneType' object is not subscriptable``): forward's inputs left at None, those
    the failing ``line`` names when it names some."""
    left = _left_none(module, args, kwargs) if "NoneType" in str(exc) else []
    named = [name for name in left if re.search(rf"\b{name}\b", line.split(": ", 1)[-1])]
    left = named or left
    return f" Inputs forward leaves at None: {', '.join(left)}; the failing line reads a None." if left else ""


def _left_none(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """``forward``'s parameters that default to None and that neither ``args`` nor ``kwargs`` set."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    given = {p.name for p in positional[:len(args)]} | {k for k, v in kwargs.items() if v is not None}
    return [p.name for p in params if p.default is None and p.name not in given][:8]
def _device_mismatch(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A how-to-fix text when an example input is on another device than the model's tensors, else ''."""
    devices = {t.device for t in [*module.parameters(), *module.buffers()]}
    if len(devices) != 1:
        return ""
    (model_dev,) = devices
    for path, leaf in pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))[0]:
        if isinstance(leaf, torch.Tensor) and leaf.device != model_dev:
            name = ("args" if path[0] == pytree.SequenceKey(0) else "kwargs") + pytree.keystr(path[1:])
            return (
                f"The example input {name} is on {leaf.device} but {type(module).__name__}'s parameters and buffers "
                f"are on {model_dev}: the model's forward runs during tracing, so they must agree. How to fix: pass "
                f"example_args/example_kwargs on {model_dev} (x.to({str(model_dev)!r})), or, to trace a big model "
                "without memory, build the model under torch.device('meta') (any example device then works). "
                "Each stage is placed later by build_stage(i, device)."
            )
    return ""


# torch's and pippy's own source folders: a traceback frame or stack-trace line there is not the user's code
LIB_DIRS = tuple(os.path.dirname(m.__file__ or "") + os.sep for m in (torch, sys.modules[__name__.split(".")[0]]))


def _user_frame(exc: BaseException) -> str | None:
    """``file:line in func: code`` of the innermost traceback frame outside torch and pippy, if any."""
    found = None
    for fr in traceback.extract_tb(exc.__traceback__):
        fname = os.path.abspath(fr.filename)
        if fname.startswith(LIB_DIRS) or fr.filename.startswith("<") or os.sep + "functools.py" in fname:
            continue
        found = f"{fr.filename}:{fr.lineno} in {fr.name}: {(fr.line or '').strip()}"
    return found


def _kind_hint(exc: BaseException) -> str:
    name = type(exc).__name__
    if "Constraints violated" in str(exc):
        return (
            "A dimension declared dynamic (dynamic_shapes) is fixed by the model, or equals another declared one; "
            "the full message says which and suggests a fix. Give equal dimensions one torch.export.Dim, leave the "
            "inputs that follow another out of dynamic_shapes (pippy lets them follow), or pass dynamic_shapes='auto'.\n"
        )
    if "DataDependent" in name or "data-dependent" in str(exc):
        return (
            "The failing construct is data-dependent control flow: Python branched on a tensor's value "
            "(`if tensor...`, bool(tensor), .item()), which a trace cannot record. A pipe_split() inside such a "
            "branch cannot work either: split points are fixed when the model is traced, so every forward must "
            "run the same pipe_split() calls; move it out of the branch.\n"
        )
    if "Unsupported" in name:
        return "The failing construct is Python the tracer does not support.\n"
    return ""


_SHAPES = re.compile(r"broadcast|must match the size|size mismatch|is invalid for input of size|cannot be multiplied")


def _shape_fix(exc: BaseException) -> str:
    """For shapes that disagree inside forward: the likely cause, an unbatched input split like the batch."""
    if not _SHAPES.search(str(exc)):
        return ""
    return (
        "Shapes disagree inside forward. The trace runs one micro-batch (each input split along its batch dim), so "
        "an input that is not batched (positions, a mask or table shared by every row) but has the batch's size "
        "there by chance was split too. How to fix: give it Replicate() (pipeline(..., args_chunk_spec=..., "
        "kwargs_chunk_spec=...)); if the model hard-codes the batch size, make it read x.shape[0] instead. "
    )

"""What a trace drops from the backward pass: custom autograd Functions, reentrant checkpoints, hooks.

``torch.export`` records the forward's operations; the stages' backward is autograd's over those.
So a custom ``torch.autograd.Function``'s own ``backward``, a tensor hook registered inside
``forward`` and ``torch.utils.checkpoint(use_reentrant=True)`` (which torch.export turns into a
no-grad region) would silently give other gradients than the model. :func:`watch_backward`
records them while tracing; ``pipeline()`` warns about them and schedules refuse to train on
such a pipe. Backward hooks registered on the model's modules and parameters before
``pipeline()`` stay on the model, not on the stages: :func:`model_backward_hooks` names them.

    >>> class Flip(torch.autograd.Function):
    ...     @staticmethod
    ...     def forward(ctx, x):
    ...         return x.clone()
    ...     @staticmethod
    ...     def backward(ctx, g):
    ...         return -g
    >>> with watch_backward() as lost:
    ...     _ = Flip.apply(torch.ones(2, requires_grad=True))
    >>> lost[0].split(":")[0]
    'custom torch.autograd.Function Flip (its backward is replaced by the autograd of its forward)'
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from pippy.frontend.notice import warn_user

__all__ = ["TRAIN_REFUSAL", "model_backward_hooks", "model_forward_hooks", "warn_lost_backward", "watch_backward"]

_SKIP = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
         os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
_REENTRANT = "torch.utils.checkpoint.CheckpointFunction"

TRAIN_REFUSAL = (
    "How to fix: write the custom backward as a torch.library.custom_op with register_autograd (torch.export keeps "
    "such an op whole, with its backward), or, when its backward is exactly autograd's of its forward, set "
    "YourFunction.pippy_traced_backward_ok = True; pass use_reentrant=False to torch.utils.checkpoint (Hugging Face: "
    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})); register "
    "gradient hooks after pipeline() on the stages' tensors or modules. Forward-only use (eval(), stage(x)) is "
    "unaffected"
)


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and pippy (the model's code)."""
    for fr in reversed(traceback.extract_stack()[:-2]):
        if not os.path.abspath(fr.filename).startswith(_SKIP) and not fr.filename.startswith("<"):
            return f"{fr.filename}:{fr.lineno}"
    return "an unknown line"


def _called_from_torch() -> bool:
    """Whether the frame that called the patched function is torch's own code (e.g. register_multi_grad_hook)."""
    caller = sys._getframe(2)
    return os.path.abspath(caller.f_code.co_filename).startswith(_SKIP[1])


_LOCK = threading.Lock()
_ACTIVE: dict[int, list[str]] = {}  # thread id -> what that thread's trace lost
_SAVED: list[Any] = []  # the original Function.apply and Tensor.register_hook while any trace watches


def _needs_grad(args: Any) -> bool:
    """Whether a tensor among ``args`` (nested in lists and tuples too) needs a gradient: else no backward runs."""
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in torch.utils._pytree.tree_leaves(args))


def _record(cls: Any, args: Any) -> None:
    """Note that this thread's traced forward applies Function ``cls`` to ``args``, if it has a backward to lose."""
    lost = _ACTIVE.get(threading.get_ident())
    if lost is None or getattr(cls, "pippy_traced_backward_ok", False):
        return
    name = f"{cls.__module__}.{cls.__qualname__}"
    if name == _REENTRANT:  # its parameters are not among its arguments
        lost.append(f"torch.utils.checkpoint(use_reentrant=True) at {_caller()} (torch.export makes what "
                    "follows it a no-grad region)")
    elif not name.startswith("torch.") and _needs_grad(args):
        lost.append(f"custom torch.autograd.Function {cls.__qualname__} (its backward is replaced by the "
                    f"autograd of its forward): {cls.__qualname__}.apply at {_caller()}")


def _apply(cls: Any, *args: Any, **kwargs: Any) -> Any:
    _record(cls, (args, kwargs))
    return _SAVED[0].__func__(cls, *args, **kwargs)


def _user_functions() -> list[tuple[type, str]]:
    """Every ``torch.autograd.Function`` subclass defined outside torch, with the method its ``apply`` alone calls and
    that it defines itself: ``setup_context`` where it has one, else ``forward`` (then given a ctx by ``apply``)."""
    out, stack, seen = [], list(torch.autograd.Function.__subclasses__()), set()
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack += cls.__subclasses__()
        if cls.__module__.startswith("torch."):
            continue
        for method in ("setup_context", "forward"):
            if isinstance(cls.__dict__.get(method), staticmethod):
                out.append((cls, method))
                break
    return out


def _watched(cls: type, method: str, fn: Any) -> Any:
    """``fn`` (``cls``'s own ``forward`` or ``setup_context``) recording its Function as :func:`_apply` does, when
    ``apply`` calls it: this catches an ``apply`` bound before the trace (``ste = STE.apply`` at import, ``self.fn =
    Fn.apply``), which the patched ``Function.apply`` never sees. A direct ``forward(None, x)`` call is not an apply."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if _ACTIVE:
            ctx_cls = getattr(args[0], "_forward_cls", None) if args else None  # the Function applied
            if isinstance(ctx_cls, type):
                _record(ctx_cls, (args[1] if method == "setup_context" and len(args) > 1 else args[1:], kwargs))
        return fn(*args, **kwargs)

    return run


def _register_hook(self: torch.Tensor, hook: Any) -> Any:
    handle = _SAVED[1](self, hook)
    lost = _ACTIVE.get(threading.get_ident())
    if lost is not None and not _called_from_torch():
        lost.append(f"a tensor hook registered in forward ({getattr(hook, '__qualname__', 'hook')}) at {_caller()}")
    return handle


@contextlib.contextmanager
def watch_backward() -> Iterator[list[str]]:
    """Within the block, record each custom autograd Function, reentrant checkpoint and tensor hook that this
    thread's forward uses (other threads are not watched). A Function whose backward is exactly autograd's of its
    forward can say so: ``MyFunction.pippy_traced_backward_ok = True``."""
    me = threading.get_ident()
    lost: list[str] = []
    with _LOCK:
        if me in _ACTIVE:  # a trace inside a trace (one thread): the outer one records
            nested = True
        else:
            nested = False
            if not _ACTIVE:
                methods = [(cls, name, cls.__dict__[name]) for cls, name in _user_functions()]
                _SAVED[:] = [torch.autograd.Function.__dict__["apply"], torch.Tensor.register_hook, methods]
                torch.autograd.Function.apply = classmethod(_apply)  # type: ignore[assignment,method-assign]
                torch.Tensor.register_hook = _register_hook  # type: ignore[method-assign]
                for cls, name, fn in methods:
                    setattr(cls, name, staticmethod(_watched(cls, name, fn.__func__)))
            _ACTIVE[me] = lost
    try:
        yield lost
    finally:
        if not nested:
            with _LOCK:
                del _ACTIVE[me]
                if not _ACTIVE:
                    torch.autograd.Function.apply = _SAVED[0]  # type: ignore[method-assign]
                    torch.Tensor.register_hook = _SAVED[1]  # type: ignore[method-assign]
                    for cls, name, fn in _SAVED[2]:
                        setattr(cls, name, fn)
                    _SAVED.clear()


def model_backward_hooks(module: nn.Module) -> list[str]:
    """The modules and parameters of ``module`` that carry backward hooks (they are not copied onto stages).

        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> _ = net[0].weight.register_hook(lambda g: g)
        >>> _ = net.register_full_backward_hook(lambda m, gi, go: None)
        >>> model_backward_hooks(net)
        ['module (the model itself)', 'parameter 0.weight']
    """
    found = []
    for name, sub in module.named_modules():
        if sub._backward_hooks or sub._backward_pre_hooks:
            found.append(f"module {name or '(the model itself)'}")
    for name, p in module.named_parameters():
        if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
            found.append(f"parameter {name}")
    return found


def model_forward_hooks(module: nn.Module) -> list[str]:
    """The modules of ``module`` with forward (pre-)hooks of the user's own (not torch's, pippy's or an installed
    library's, such as transformers' output capturing): a trace runs them once, keeping what they compute, but a
    pipelined step runs the stages' graphs, not the hooks.

        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> seen = []
        >>> _ = net[0].register_forward_hook(lambda m, i, o: seen.append(o))
        >>> model_forward_hooks(net)
        ['0 (<lambda>)']
    """
    found = []
    for name, sub in module.named_modules():
        own = [h for h in (*sub._forward_pre_hooks.values(), *sub._forward_hooks.values()) if not _library_code(h)]
        if own:
            names = dict.fromkeys(getattr(h, "__name__", type(h).__name__) for h in own)
            found.append(f"{name or '(the model itself)'} ({', '.join(names)})")
    return found


def _library_code(fn: Any) -> bool:
    """Whether a hook is defined in torch, pippy or an installed package (site-packages), not in the user's code."""
    fn = getattr(fn, "__func__", fn)  # a bound method
    fn = getattr(fn, "func", fn)  # functools.partial
    call = next((c.__dict__["__call__"] for c in type(fn).__mro__ if "__call__" in c.__dict__), None)  # an object
    code = getattr(fn, "__code__", None) or getattr(call, "__code__", None)
    if code is None:
        return True  # a builtin
    path = os.path.abspath(code.co_filename) if not code.co_filename.startswith("<") else code.co_filename
    return path.startswith(_SKIP) or f"{os.sep}site-packages{os.sep}" in path or f"{os.sep}dist-packages{os.sep}" in path


def warn_lost_backward(lost: list[str], hooks: list[str], forward_hooks: Sequence[str] = ()) -> None:
    """``pipeline()``'s warnings about what :func:`watch_backward` recorded and the model's backward and forward hooks."""
    if forward_hooks:
        warn_user(
            f"pipeline(): forward hooks on {', '.join(forward_hooks[:4])}{', ...' if len(forward_hooks) > 4 else ''} "
            "ran once while tracing: what they return is part of the stages' graphs, but they do not run in a "
            "pipelined step (what they store or count, e.g. captured activations, stays empty). A hook for its side "
            "effects: remove it from the model before pipeline() and register it after build_stage on the stage's "
            "block (stage.submod.get_submodule(name), the model's names). A hook that changes values is in the graph "
            "already: registering it again would apply it twice"
        )
    if lost:
        warn_user(
            f"pipeline(): forward uses {'; '.join(dict.fromkeys(lost))}. A pipe's backward is autograd's over the "
            "traced operations, so these would give other gradients than the model: training schedules refuse "
            f"this pipe. {TRAIN_REFUSAL}"
        )
    if hooks:
        warn_user(
            f"pipeline(): backward hooks on {', '.join(hooks[:4])}{', ...' if len(hooks) > 4 else ''} stay on the "
            "model: stages hold their own modules and parameters, so these hooks do not run in a pipelined step "
            "(and a stage's parameter gradient accumulates over micro-batches, so a hook would see each "
            "micro-batch's part). Register them after build_stage on the stage's module (stage.submod) or "
            "parameters instead"
        )

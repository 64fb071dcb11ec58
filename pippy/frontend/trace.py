"""Capture a model with torch.export; the ``pipe_split()`` marker op and ``annotate_split_points``.

    >>> import torch
    >>> from pippy import annotate_split_points, SplitPoint
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> annotate_split_points(net, {"0": SplitPoint.END})
    >>> sum(is_split_marker(n) for n in export_module(net, (torch.ones(1, 4),)).module().graph.nodes)
    1
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from pippy.frontend.tracefail import LIB_DIRS, explain_trace_failure

__all__ = [
    "PipeTraceError",
    "SplitPoint",
    "annotate_split_points",
    "export_module",
    "is_split_marker",
    "mark_split_points",
    "model_line",
    "no_kv_cache",
    "pipe_split",
    "pipe_split_op",
    "split_site",
    "trace_count",
    "unfired_split_points",
]

_LIB = torch.library.Library("pippy", "DEF")
_LIB.define("pipe_split() -> ()")
_LIB.impl("pipe_split", lambda: None, "CompositeExplicitAutograd")
_LIB.impl("pipe_split", lambda: None, "Meta")
_MARKER = torch.ops.pippy.pipe_split.default
fx.node.has_side_effect(_MARKER)


def pipe_split() -> None:
    """Mark a stage boundary inside ``forward``; a no-op when run eagerly.

        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         x = self.a(x)
        ...         pipe_split()          # everything below runs in the next stage
        ...         return self.b(x)
        >>> Net()(torch.ones(1, 4)).shape     # eagerly, the marker does nothing
        torch.Size([1, 4])
        >>> from pippy import pipeline
        >>> pipeline(Net(), 1, (torch.ones(1, 4),)).num_stages
        2
    """
    torch.ops.pippy.pipe_split()


def pipe_split_op() -> Any:
    """The op a traced ``pipe_split()`` becomes (a graph policy may insert it).

        >>> str(pipe_split_op())
        'pippy.pipe_split.default'
    """
    return _MARKER


_PEER_MARKER = "pippy._pipe_split.default"  # PyTorch pipelining's own pipe_split() op, read by name (never imported)


def is_split_marker(node: fx.Node) -> bool:
    """True when ``node`` is a traced ``pipe_split()`` call (ours, or PyTorch pipelining's, so that model code
    written for it splits here too)."""
    return node.op == "call_function" and (node.target is _MARKER or str(node.target) == _PEER_MARKER)


class SplitPoint(Enum):
    """Where a split goes relative to the named submodule."""

    BEGINNING = "beginning"
    END = "end"


class PipeTraceError(RuntimeError):
    """torch.export could not capture the model (or a split point is wrong)."""


def annotate_split_points(module: nn.Module, spec: Mapping[str, SplitPoint]) -> None:
    """Insert ``pipe_split()`` before or after the named submodules' ``forward``.

    The model's code is unchanged: each named submodule gets a forward (pre-)hook that calls
    ``pipe_split()``, so the model still deep-copies and pickles as before.

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
        >>> annotate_split_points(net, {"1": SplitPoint.END})
        >>> from pippy import pipeline
        >>> [info.input_names for info in pipeline(net, 1, (torch.ones(1, 4),)).stage_infos][1]
        ['relu']
    """
    mark_split_points(module, spec)


def mark_split_points(module: nn.Module, spec: Mapping[str, SplitPoint]) -> list[Any]:
    """:func:`annotate_split_points`, returning the hooks' handles (``split_spec`` removes them after tracing)."""
    names = [n for n, _ in module.named_modules() if n]
    checked: list[tuple[nn.Module, SplitPoint]] = []
    for fqn, point in spec.items():
        try:
            sub = module.get_submodule(fqn)
        except AttributeError:
            close = difflib.get_close_matches(fqn, names, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise PipeTraceError(
                f"split point {fqn!r} names no submodule of {type(module).__name__}.{hint} "
                f"Use a name from model.named_modules(), e.g. {names[:4]}."
            ) from None
        if not isinstance(point, SplitPoint) and type(point).__name__ == "SplitPoint" and \
                getattr(point, "name", None) in ("BEGINNING", "END"):
            point = SplitPoint[point.name]  # PyTorch pipelining's own enum, used as ours
        if not isinstance(point, SplitPoint):
            raise PipeTraceError(f"split point for {fqn!r} must be SplitPoint.BEGINNING or SplitPoint.END, got {point!r}")
        checked.append((sub, point))
    handles = []
    for sub, point in checked:
        hooks, fn = ((sub._forward_pre_hooks, _split_at_beginning) if point is SplitPoint.BEGINNING
                     else (sub._forward_hooks, _split_at_end))
        if any(h is fn for h in hooks.values()):
            continue  # marked already
        sub.__dict__.setdefault(_MARK, id(sub))
        if point is SplitPoint.BEGINNING:
            handles.append(sub.register_forward_pre_hook(_split_at_beginning))
        else:
            handles.append(sub.register_forward_hook(_split_at_end))
    return handles


_FIRED: set[int] = set()  # the marks whose split hook ran (tracing checks that every marked module was called)
_MARK = "_pippy_split_mark"  # a marked module's token (export may call a copy of the module: ids differ)


def _split_at_beginning(module: nn.Module, args: Any) -> None:
    _FIRED.add(module.__dict__.get(_MARK, id(module)))
    torch.ops.pippy.pipe_split()


def _split_at_end(module: nn.Module, args: Any, output: Any) -> None:
    _FIRED.add(module.__dict__.get(_MARK, id(module)))
    torch.ops.pippy.pipe_split()


_split_at_beginning.pippy_split_point = _split_at_end.pippy_split_point = True  # type: ignore[attr-defined]


def unfired_split_points(module: nn.Module, trace: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Run ``trace()``; return its result and the submodules of ``module`` marked with a split point whose hook never
    ran (called as ``sub.forward(...)``, which skips hooks, or not at all).

        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> annotate_split_points(net, {"0": SplitPoint.END})
        >>> unfired_split_points(net, lambda: net[1](torch.ones(1, 2)))[1]
        ['0']
    """
    _FIRED.clear()
    result = trace()
    lost = [name or "(the model)" for name, sub in module.named_modules()
            if (any(h is _split_at_beginning for h in sub._forward_pre_hooks.values())
                or any(h is _split_at_end for h in sub._forward_hooks.values()))
            and sub.__dict__.get(_MARK, id(sub)) not in _FIRED]
    return result, lost


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)\n\s*(?P<code>[^\n]*)')


def split_site(node: fx.Node) -> str:
    """Where the traced ``pipe_split()`` ``node`` came from, for messages: ``file:line in func: code``.

    A split point made by ``annotate_split_points`` / ``split_spec`` is named by its submodule.

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> annotate_split_points(net, {"0": SplitPoint.END})
        >>> gm = export_module(net, (torch.ones(1, 4),)).module()
        >>> [split_site(n) for n in gm.graph.nodes if is_split_marker(n)]
        ["SplitPoint.END of '0' (split_spec / annotate_split_points)"]
    """
    frames = list(_FRAME.finditer(str(node.meta.get("stack_trace") or "")))
    stack = node.meta.get("nn_module_stack") or {}
    if frames and stack and "pipe_split" not in frames[-1]["code"]:  # a hook of annotate_split_points: the trace
        key, (fqn, _) = list(stack.items())[-1]  # shows the line calling the module, and the module it marks
        after = node.next
        while after.op != "output" and (after.op != "call_function" or is_split_marker(after)):
            after = after.next
        point = "BEGINNING" if key in (after.meta.get("nn_module_stack") or {}) else "END"
        return f"SplitPoint.{point} of {str(fqn)!r} (split_spec / annotate_split_points)"
    return model_line(node) or "a pipe_split() call (source line unknown)"


def model_line(node: fx.Node) -> str:
    """The model's own source line that made ``node`` (``file:line in func: code``), '' when the trace has none.

        >>> class Twice(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * 2
        >>> gm = export_module(Twice(), (torch.ones(1, 2),)).module()
        >>> model_line(next(n for n in gm.graph.nodes if n.op == "call_function")).endswith("return x * 2")
        True
    """
    for fr in reversed(list(_FRAME.finditer(str(node.meta.get("stack_trace") or "")))):
        if not os.path.abspath(fr["file"]).startswith(LIB_DIRS):
            return f"{fr['file']}:{fr['line']} in {fr['func']}: {fr['code'].strip()}"
    return ""


_TRACES = [0]


def trace_count() -> int:
    """How many times this process has traced a model (``export_module`` calls); tests count retraces.

        >>> before = trace_count(); _ = export_module(torch.nn.Linear(2, 2), (torch.ones(2, 2),))
        >>> trace_count() - before
        1
    """
    return _TRACES[0]


# torch.export warns that an RNN's ``_flat_weights`` (its list of references to its own registered parameters,
# rebuilt when they are swapped for the trace) were "assigned during export"; it restores them, and every traced RNN
# says so. Only a warning that names nothing but such entries is dropped.
_FLAT_WEIGHT = r"self[\w.]*\._flat_weights\[\d+\]"
_RNN_FLAT_WEIGHTS = rf"The tensor attributes? {_FLAT_WEIGHT}(?:, {_FLAT_WEIGHT})* (?:was|were) assigned during export\."


def export_module(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, dynamic_shapes: Any = None
) -> torch.export.ExportedProgram:
    """Capture ``module`` with non-strict ``torch.export`` on one micro-batch of example input.

    A module whose tensors are on the meta device is traced with its example inputs moved to meta.
    Hugging Face models are traced with ``config.use_cache`` off (see :func:`no_kv_cache`).
    ``dynamic_shapes`` is torch.export's (see :func:`pippy.frontend.dynamic.export_dynamic_shapes`).

        >>> ep = export_module(torch.nn.Linear(2, 2), (torch.randn(3, 2),))
        >>> ep.module()(torch.ones(3, 2)).shape
        torch.Size([3, 2])
    """
    kwargs = kwargs or {}
    sharded = [n for n, p in module.named_parameters() if hasattr(p, "placements") and hasattr(p, "device_mesh")]
    if sharded:
        raise PipeTraceError(
            f"{type(module).__name__} has DTensor parameters ({sharded[0]}, {len(sharded)} in all): it was sharded "
            "(fully_shard / parallelize_module) before pipeline(). Expected the plain model: call pipeline() first, "
            "then shard each stage's module (stage.submod) on its data/tensor-parallel mesh"
        )
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        # a model built on the meta device traces with meta inputs (no data is read, devices agree)
        args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
    _TRACES[0] += 1
    with no_kv_cache(module) as cache_off:  # the failure's diagnosis runs forward as the trace did, then as called
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_RNN_FLAT_WEIGHTS, category=UserWarning)
                return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:  # torch.export raises many types; we wrap them all
            raise PipeTraceError(explain_trace_failure(module, args, kwargs, exc, cache_off)) from exc


@contextlib.contextmanager
def no_kv_cache(module: nn.Module) -> Iterator[list[str]]:
    """Within the block, every ``config.use_cache`` in ``module`` (Hugging Face models) is False.

    A pipeline step runs whole sequences, so a key/value cache is never reused; returning one would
    put a ``DynamicCache`` object among the outputs, which cannot be sent between stages. The
    pipelined model's ``past_key_values`` output is therefore None. Yields the names of the
    submodules whose config was switched.

        >>> class Cfg:
        ...     use_cache = True
        >>> net = torch.nn.Linear(1, 1); net.config = Cfg()
        >>> with no_kv_cache(net) as switched:
        ...     net.config.use_cache, switched
        (False, [''])
        >>> net.config.use_cache
        True
    """
    switched: list[tuple[str, Any]] = []
    seen: set[int] = set()
    for name, sub in module.named_modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and id(cfg) not in seen and getattr(cfg, "use_cache", False) is True:
            seen.add(id(cfg))
            switched.append((name, cfg))
    try:
        for _, cfg in switched:
            cfg.use_cache = False
        yield [name for name, _ in switched]
    finally:
        for _, cfg in switched:
            cfg.use_cache = True

"""Variable shapes: ``pipeline(dynamic_shapes=...)`` in torch.export's form, and each micro-batch checked against it.

A pipe traced with dynamic dimensions accepts, without tracing again, any size that torch.export
kept valid for them (its ``range_constraints``). The stage graphs then compute with symbolic sizes,
and only the edges whose shapes vary send a small shape header (see the executor).

    >>> import torch
    >>> from pippy import pipeline
    >>> net = torch.nn.Linear(8, 2)
    >>> pipe = pipeline(net, 2, (torch.randn(4, 3, 8),), dynamic_shapes={"input": {1: (2, 64)}})
    >>> pipe.split_inputs((torch.randn(4, 33, 8),), {}, 2)[0][0].shape      # another sequence length
    torch.Size([2, 33, 8])
    >>> pipe.input_dims[0]          # dimension 0 was not named: static
    (2, SymDim(name='s...', lo=2, hi=64), 8)
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from pippy.microbatch.errors import PipeliningShapeError

__all__ = ["SymDim", "check_dims", "describe_input_dims", "export_dynamic_shapes", "sym_dims", "sym_hint"]


@dataclass(frozen=True, slots=True)
class SymDim:
    """A dimension that varies: the traced symbol's name and its valid range (``hi`` None: unbounded).

        >>> SymDim("s0", 2, 64).describe()
        '2..64'
    """

    name: str
    lo: int
    hi: int | None

    def describe(self) -> str:
        """The range as ``lo..hi`` (``lo..`` when unbounded)."""
        return f"{self.lo}..{'' if self.hi is None else self.hi}"

    def __repr__(self) -> str:  # the symbol's number depends on the trace: keep doctests stable
        return f"SymDim(name='s...', lo={self.lo}, hi={self.hi})"


def export_dynamic_shapes(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], spec: Any) -> Any:
    """``dynamic_shapes`` for ``torch.export.export`` from pippy's forms of ``spec``.

    - ``"auto"``: every dimension of every tensor input may vary (``Dim.AUTO``: torch.export keeps
      static what the model fixes, e.g. a hidden size that meets a weight).
    - a dict keyed by ``forward``'s argument names: per tensor input, ``{dim: (lo, hi)}`` ranges (or
      ``Dim`` objects, or ``None`` for static); the dims not named there are static. Inputs the dict
      does not name follow the named ones (``Dim.AUTO``), so an attention mask takes the sequence
      length of ``input_ids`` without being named. Any other value is passed to torch.export as is.

    Ranges are per micro-batch: a batch dimension range bounds the full batch / ``num_chunks``.

        >>> export_dynamic_shapes(torch.nn.Linear(2, 2), (torch.ones(3, 2),), {}, {"input": {0: (2, 8)}})  # min 2 is the default
        {'input': {0: Dim('input_0', max=8)}}
    """
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"dynamic_shapes needs forward's signature to name the inputs: {exc}") from exc
    if spec == "auto":
        user: Mapping[str, Any] = {}
    elif isinstance(spec, Mapping):
        user = spec
        known = set(sig.parameters) | {
            k for name, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD for k in bound.arguments.get(name, {})
        }
        unknown = sorted(set(user) - known)
        if unknown:
            raise ValueError(
                f"dynamic_shapes names {unknown}, which are not inputs of {type(module).__name__}.forward; its inputs "
                f"in this call are {sorted(bound.arguments)}. Key dynamic_shapes by forward's argument names"
            )
    else:
        return spec  # torch.export's own tuple form
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: _one(k, v, user.get(k, _FOLLOW)) for k, v in value.items()}
        elif sig.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(_one(f"{name}[{i}]", v, _FOLLOW) for i, v in enumerate(value))
        else:
            out[name] = _one(name, value, user.get(name, _FOLLOW))
    return out


_FOLLOW = object()  # an input the user did not name: every dimension AUTO


def _one(name: str, value: Any, want: Any) -> Any:
    if want is _FOLLOW:
        return pytree.tree_map(lambda v: {d: Dim.AUTO for d in range(v.dim())} if isinstance(v, torch.Tensor) else None,
                               value)
    if not (isinstance(want, Mapping) and isinstance(value, torch.Tensor)):
        return want
    dims: dict[int, Any] = {}
    for d, rng in want.items():
        if not isinstance(d, int) or not -value.dim() <= d < value.dim():
            raise ValueError(
                f"dynamic_shapes[{name!r}] names dimension {d!r}, but the example {name} has {value.dim()} "
                f"dimensions (shape {tuple(value.shape)}); use 0..{value.dim() - 1}"
            )
        d %= value.dim()
        if isinstance(rng, tuple) and len(rng) == 2 and all(isinstance(x, int) or x is None for x in rng):
            lo, hi = rng
            size = value.shape[d]
            if (lo is not None and size < lo) or (hi is not None and size > hi):
                raise ValueError(
                    f"dynamic_shapes[{name!r}][{d}] is the range {lo}..{hi}, but the example micro-batch has size "
                    f"{size} there (full batch / num_chunks for dimension 0); trace with an example inside the range"
                )
            ident = re.sub(r"\W", "_", f"{name}_{d}")
            dims[d] = Dim(ident, **({"min": lo} if lo is not None else {}), **({"max": hi} if hi is not None else {}))
        else:
            dims[d] = rng
    return dims


def sym_hint(d: Any) -> int:
    """The traced (example) value of a size that may be symbolic.

        >>> sym_hint(5)
        5
    """
    if isinstance(d, torch.SymInt):
        hint = d.node.hint
        if hint is None:  # an expression of traced sizes, or a size that depends on the data (h[mask]): a heuristic
            try:
                from torch.fx.experimental.symbolic_shapes import optimization_hint
            except ImportError:  # torch before 2.10: backed sizes only
                return int(d.node.shape_env.size_hint(d.node.expr))
            hint = optimization_hint(d, fallback=0)
        return int(hint)
    return int(d)


def sym_dims(shape: Sequence[Any]) -> tuple[int, ...]:
    """The indices of the dimensions of ``shape`` that are symbolic (vary between micro-batches).

        >>> sym_dims(torch.Size([2, 3]))
        ()
    """
    return tuple(i for i, d in enumerate(shape) if isinstance(d, torch.SymInt) and d.node.expr.free_symbols)


def describe_input_dims(gm: fx.GraphModule, ranges: Mapping[Any, Any]) -> list[tuple[int | SymDim, ...] | None]:
    """Per flattened input (the graph's placeholders): each dim's size, or its :class:`SymDim` when it varies.

    ``ranges`` is the exported program's ``range_constraints``. A dim whose size is an expression of
    several symbols (rare in inputs) is recorded by the expression's text with no bounds.

        >>> from pippy.frontend.trace import export_module
        >>> ep = export_module(torch.nn.Linear(4, 2), (torch.ones(3, 4),), dynamic_shapes={"input": {0: Dim.AUTO}})
        >>> describe_input_dims(ep.module(), ep.range_constraints)
        [(SymDim(name='s...', lo=2, hi=None), 4)]
    """
    out: list[tuple[int | SymDim, ...] | None] = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            out.append(None)
            continue
        dims: list[int | SymDim] = []
        for d in val.shape:
            if isinstance(d, torch.SymInt) and d.node.expr.free_symbols:
                expr = d.node.expr
                vr = ranges.get(expr)
                lo = _bound(vr.lower) if vr is not None else None
                hi = _bound(vr.upper) if vr is not None else None
                lo = 0 if lo is None else lo
                dims.append(SymDim(str(expr), lo, hi))
            else:
                dims.append(sym_hint(d))
        out.append(tuple(dims))
    return out


def _bound(x: Any) -> int | None:
    """An integer range end, or None for an infinite one."""
    try:
        return int(x) if bool(x.is_integer) and bool(x.is_finite) else None
    except (TypeError, ValueError, AttributeError):
        return None


def check_dims(name: str, got: torch.Tensor, want: tuple[int | SymDim, ...], bound: dict[str, tuple[int, str]]) -> None:
    """Raise ``PipeliningShapeError`` (a ``ValueError``) unless tensor ``got`` fits ``want``; ``bound`` keeps each symbol's size so far.

    Sizes of one symbol must agree across inputs (e.g. ``input_ids`` and ``attention_mask`` lengths).

        >>> check_dims("x", torch.ones(2, 300), (2, SymDim("s0", 2, 256)), {})
        Traceback (most recent call last):
        ...
        pippy.runtime.stage.PipeliningShapeError: x: dimension 1 is 300, outside the range 2..256 it was traced for ...
    """
    if got.dim() != len(want):
        raise PipeliningShapeError(f"{name}: has {got.dim()} dimensions (shape {tuple(got.shape)}), traced with {len(want)}")
    for i, (size, w) in enumerate(zip(got.shape, want)):
        if isinstance(w, int):
            if size != w:
                raise PipeliningShapeError(
                    f"{name}: dimension {i} is {size}, but it was traced as static {w} (shape "
                    f"{tuple(got.shape)} vs {_show(want)}). How to fix: declare it dynamic, e.g. "
                    f"pipeline(..., dynamic_shapes={{'<input>': {{{i}: (lo, hi)}}}}) or dynamic_shapes='auto'; or, if "
                    "you did, the model fixed it during tracing (it meets a weight or a constant)"
                )
            continue
        if size < w.lo or (w.hi is not None and size > w.hi):
            raise PipeliningShapeError(
                f"{name}: dimension {i} is {size}, outside the range {w.describe()} it was traced for "
                f"(shape {tuple(got.shape)} vs {_show(want)}; per micro-batch). How to fix: keep it in range, or trace with a wider "
                f"range in dynamic_shapes.{_SMALL if size < 2 else ''}"
            )
        seen = bound.get(w.name)
        if seen is None:
            bound[w.name] = (int(size), f"{name} dimension {i}")
        elif seen[0] != size and not _depends(w.name):
            raise PipeliningShapeError(
                f"{name}: dimension {i} is {size}, but {seen[1]} is {seen[0]}; the trace found them equal "
                f"(both are {w.name}). Pass inputs whose sizes agree"
            )


_SMALL = (
    " torch.export never lets a dynamic size be 0 or 1 (it specializes those), so the smallest is 2: for a "
    "batch dimension, pad the batch so that every micro-batch has at least 2 rows"
)


def _depends(name: str) -> bool:
    """True for a compound size expression (not a single symbol): checked by the graph, not here."""
    try:
        return not isinstance(sympy.sympify(name), sympy.Symbol)
    except (sympy.SympifyError, TypeError):
        return True


def _show(want: tuple[int | SymDim, ...]) -> str:
    return "(" + ", ".join(str(w) if isinstance(w, int) else w.describe() for w in want) + ")"

"""The call a recomputed elementwise region becomes: an autograd op that keeps only the region's inputs.

:class:`RegionCall` runs its region without saving intermediates; backward runs it again and
differentiates. Its outputs carry a recipe (the region and the inputs it kept), and under
:func:`keep_recipes` an op that saves one of those outputs for its own backward (the matmul
after an activation) saves the recipe instead: the output is rebuilt when that backward needs it,
and the region's own backward reuses the rebuild, so it runs once.

    >>> import torch
    >>> from torch import fx
    >>> gm = fx.symbolic_trace(lambda x: (torch.tanh(torch.exp(x)),))
    >>> call, w = RegionCall(gm, "exp, tanh"), torch.randn(3, 2, requires_grad=True)
    >>> x = torch.randn(4, 3, requires_grad=True)
    >>> with keep_recipes():
    ...     y = call(x)[0] @ w            # the matmul keeps a recipe, not tanh's output
    >>> y.sum().backward()
    >>> x2 = x.detach().requires_grad_()
    >>> (torch.tanh(torch.exp(x2)) @ w).sum().backward()
    >>> torch.equal(x.grad, x2.grad)
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["RegionCall", "keep_recipes"]

_ATTR = "_pippy_region_recipe"


class _Recipe:
    """A region and the very inputs its autograd op kept; rebuilds the region's outputs (with their graph) once
    per backward."""

    __slots__ = ("args", "fn", "stash")

    def __init__(self, fn: Callable[..., tuple[Any, ...]], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.stash: tuple[tuple[Any, ...], list[Any]] | None = None

    def rebuild(self) -> tuple[tuple[Any, ...], list[Any]]:
        """(outputs, leaf inputs) of the region run again with autograd on; kept until :meth:`take`."""
        if self.stash is None:
            leaves = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in self.args]
            with torch.enable_grad():
                self.stash = (self.fn(*leaves), leaves)
        return self.stash

    def take(self) -> tuple[tuple[Any, ...], list[Any]]:
        """The rebuild (made now if no consumer made it), handed over and forgotten."""
        out = self.rebuild()
        self.stash = None
        return out


class _Recompute(torch.autograd.Function):  # type: ignore[misc]
    """Run a region without saving its intermediates; in backward run it again and differentiate."""

    @staticmethod
    def forward(ctx: Any, recipe: _Recipe, *args: Any) -> Any:  # type: ignore[override]
        ctx.recipe = recipe
        ctx.save_for_backward(*(a for a in args if isinstance(a, torch.Tensor)))  # counted, and version-checked
        outs = recipe.fn(*args)
        ctx.mark_non_differentiable(*(o for o in outs if not (o.dtype.is_floating_point or o.dtype.is_complex)))
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        _ = ctx.saved_tensors  # raises if an input changed in place since the forward
        outs, leaves = ctx.recipe.take()
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        need = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], need, [g for _, g in pairs], allow_unused=True)
                   if pairs and need else [None] * len(need))
        return (None, *(next(got) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in leaves))


class RegionCall(nn.Module):  # type: ignore[misc]
    """The call a recomputed region becomes (no parameters; its graph is held, not registered).

        >>> import torch
        >>> from torch import fx
        >>> call = RegionCall(fx.symbolic_trace(lambda x: (torch.tanh(x) * 2,)), "tanh, mul")
        >>> call(torch.zeros(2, requires_grad=True))[0].tolist(), call
        ([0.0, 0.0], RegionCall(tanh, mul))
    """

    def __init__(self, fn: Callable[..., tuple[Any, ...]], label: str) -> None:
        super().__init__()
        self.__dict__["fn"] = fn
        self.label = label

    def forward(self, *args: Any) -> tuple[Any, ...]:
        if not (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            return self.fn(*args)  # type: ignore[no-any-return]
        recipe = _Recipe(self.fn, args)
        outs = _Recompute.apply(recipe, *args)
        # a recipe is rebuilt in a later op's backward; parameters may not be there then (FSDP2 frees the
        # unsharded copy until its own module's backward), so a region that reads one hands out no recipe
        if not any(isinstance(a, nn.Parameter) for a in args):
            for j, o in enumerate(outs):
                setattr(o, _ATTR, (recipe, j))
        return outs  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return self.label


class _Packed:
    __slots__ = ("geometry", "index", "recipe")

    def __init__(self, recipe: _Recipe, index: int, geometry: tuple[Any, ...] | None) -> None:
        self.recipe, self.index, self.geometry = recipe, index, geometry


@contextlib.contextmanager
def keep_recipes() -> Iterator[None]:
    """While active, an op that saves a region's output (or a view of it) keeps the region's recipe instead.

    Other saved tensors go to the hooks that were active before (e.g. an activation counter), or
    are kept as usual.

        >>> with keep_recipes():
        ...     pass
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    outer = top(False) if top is not None else None
    outer_pack, outer_unpack = outer if outer is not None else (None, None)

    def pack(t: torch.Tensor) -> Any:
        base = t._base if t._base is not None else t
        tag = getattr(base, _ATTR, None)
        if tag is not None:
            same = t is base or (t.size() == base.size() and t.stride() == base.stride()
                                 and t.storage_offset() == base.storage_offset())
            return _Packed(tag[0], tag[1], None if same else (t.size(), t.stride(), t.storage_offset()))
        # a detached alias (same storage): returning ``t`` would tie a saved output to its own node in a cycle
        return outer_pack(t) if outer_pack is not None else t.detach()

    def unpack(p: Any) -> torch.Tensor:
        if isinstance(p, _Packed):
            out = p.recipe.rebuild()[0][p.index].detach()
            return out if p.geometry is None else out.as_strided(*p.geometry)
        return outer_unpack(p) if outer_unpack is not None else p  # type: ignore[no-any-return]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield

"""A GraphModule whose copies (``copy.deepcopy``, ``torch.save`` / ``torch.load``) keep non-persistent buffers so.

``fx.GraphModule`` rebuilds itself on a deepcopy or an unpickle, registering every buffer its graph
reads as persistent, and the modules it creates along attribute paths lose their
``_non_persistent_buffers_set``. A copy of a stage module would then list rotary ``inv_freq`` and
the like in its ``state_dict()``, which the original model's does not. Stage modules are built as
:class:`KeepBuffersGraphModule`, whose copies take every module's set back.

    >>> import copy, torch
    >>> from torch import fx
    >>> holder = torch.nn.Module()
    >>> holder.register_buffer("scale", torch.ones(2), persistent=False)
    >>> g = fx.Graph()
    >>> _ = g.output(g.get_attr("scale"))
    >>> gm = KeepBuffersGraphModule(holder, g)
    >>> gm._non_persistent_buffers_set = {"scale"}
    >>> list(copy.deepcopy(gm).state_dict()), list(copy.deepcopy(fx.GraphModule(holder, g)).state_dict())
    ([], ['scale'])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx, nn

__all__ = ["KeepBuffersGraphModule", "non_persistent_sets", "restore_non_persistent"]


def non_persistent_sets(module: nn.Module) -> dict[str, set[str]]:
    """Every submodule's non-persistent buffer names, by module path.

        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Module())
        >>> m[0].register_buffer("b", torch.ones(1), persistent=False)
        >>> non_persistent_sets(m)
        {'0': {'b'}}
    """
    return {name: set(sub._non_persistent_buffers_set) for name, sub in module.named_modules()
            if sub._non_persistent_buffers_set}


def restore_non_persistent(module: nn.Module, sets: dict[str, set[str]]) -> nn.Module:
    """Give ``module``'s submodules back the non-persistent sets ``sets`` (from :func:`non_persistent_sets`).

        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Module())
        >>> m[0].register_buffer("b", torch.ones(1))
        >>> list(restore_non_persistent(m, {"0": {"b"}}).state_dict())
        []
    """
    for name, names in sets.items():
        try:
            sub = module.get_submodule(name)
        except AttributeError:
            continue
        sub._non_persistent_buffers_set = set(names)
    return module


def _rebuild(fn: Callable[..., nn.Module], args: tuple[Any, ...], sets: dict[str, set[str]]) -> nn.Module:
    return restore_non_persistent(fn(*args), sets)


class KeepBuffersGraphModule(fx.GraphModule):  # type: ignore[misc]
    """``fx.GraphModule`` whose deepcopies and unpickled copies keep every submodule's non-persistent buffers.

        >>> import io, torch
        >>> holder = torch.nn.Module()
        >>> holder.register_buffer("scale", torch.ones(2), persistent=False)
        >>> g = fx.Graph()
        >>> _ = g.output(g.get_attr("scale"))
        >>> gm = KeepBuffersGraphModule(holder, g)
        >>> gm._non_persistent_buffers_set = {"scale"}
        >>> buf = io.BytesIO()
        >>> torch.save(gm, buf)
        >>> _ = buf.seek(0)
        >>> list(torch.load(buf, weights_only=False).state_dict())
        []
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> fx.GraphModule:
        res = super().__deepcopy__(memo)
        restore_non_persistent(res, non_persistent_sets(self))
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        fn, args = super().__reduce__()[:2]
        return (_rebuild, (fn, args, non_persistent_sets(self)))


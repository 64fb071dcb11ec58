"""A GraphModule whose copies (``copy.deepcopy``, ``torch.save`` / ``torch.load``) are the module it copies.

``fx.GraphModule`` rebuilds itself on a deepcopy or an unpickle from its graph's attribute reads:
every buffer it reads becomes persistent, modules it creates along attribute paths lose their
``_non_persistent_buffers_set``, and attributes the graph does not name (pippy's marks, such as the
traced train / eval modes its graphs follow) are dropped; an unpickled copy's graph is traced again
from the generated code, without the node metadata pippy reads. A copy of a stage module would then
list rotary ``inv_freq`` in its ``state_dict()`` and keep running a batch norm in the mode it was
copied in. Stage modules are built as :class:`KeepBuffersGraphModule`, whose copies take every
attribute and the graph itself (pickled by :mod:`pippy.frontend.graphpickle`) and follow the
modules' modes again; like fx's copies, they drop forward and backward hooks.

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

import copy
from collections.abc import Callable
from typing import Any

from torch import fx, nn

from pippy.frontend.graphpickle import GraphState, graph_from_state, graph_state
from pippy.frontend.trainmode import keep_following

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
    """Unpickle a module pickled by an older pippy (its code traced again)."""
    return restore_non_persistent(fn(*args), sets)


# a copy starts without these, as fx's own copies do (a hook may hold the stage or a process group)
_CALL_HOOKS = frozenset({"_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                         "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                         "_backward_pre_hooks", "_is_full_backward_hook", "_compiled_call_impl"})


def _state(module: fx.GraphModule) -> dict[str, Any]:
    return {k: v for k, v in module.__dict__.items() if k not in _CALL_HOOKS and k != "_graph"}


def _fill(res: fx.GraphModule, state: dict[str, Any], graph: fx.Graph, sets: dict[str, set[str]]) -> fx.GraphModule:
    res.__dict__.update(state)
    res.graph = graph  # recompiles: the generated code is this graph's
    restore_non_persistent(res, sets)  # a module that rebuilt itself inside (a nested GraphModule) loses its set
    traced = res.__dict__.get("_pippy_traced_modes")
    if traced is not None:  # the copy's graphs follow its modules' train / eval flags, as the original's
        keep_following(res, traced)
    return res


def _restore(cls: type, class_name: str, state: dict[str, Any], graph: GraphState,
             sets: dict[str, set[str]]) -> fx.GraphModule:
    """Unpickle a :class:`KeepBuffersGraphModule` (its ``__reduce__``)."""
    return _fill(cls(nn.Module(), fx.Graph(), class_name=class_name), state, graph_from_state(graph), sets)


class KeepBuffersGraphModule(fx.GraphModule):  # type: ignore[misc]
    """``fx.GraphModule`` whose deepcopies and unpickled copies keep every attribute, submodule and graph as they were.

    Every submodule keeps its non-persistent buffers so, and a stage's copy follows ``.train()`` /
    ``.eval()`` as the stage does.

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
        res = _base(self)(nn.Module(), fx.Graph(), class_name=type(self).__name__)
        memo[id(self)] = res
        state, graph = copy.deepcopy((_state(self), self.graph), memo)
        _fill(res, state, graph, non_persistent_sets(self))
        for hook in self.__dict__.get("_deepcopy_hooks", ()):
            hook(res)
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (_base(self), type(self).__name__, _state(self), graph_state(self.graph),
                           non_persistent_sets(self)))


def _base(module: fx.GraphModule) -> type:
    """The class ``module`` was made as (fx gives every GraphModule its own subclass of it)."""
    return next(c for c in type(module).__mro__ if c.__qualname__.split(".")[-1] != "GraphModuleImpl")

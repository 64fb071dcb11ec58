"""A stage's module: its copy on the device, its flat graph, its train / eval modes, its state dict.

:class:`StageModule` is the half of :class:`~pippy.runtime.stage.Stage` that is about the
module rather than the micro-batches: the outlined copy made for the device
(:func:`materialize_module`), the flat graph split backward taps, the graphs kept in step with
``.train()`` / ``.eval()``, and the state dict under the model's FQNs.

    >>> import torch
    >>> from pippy import pipeline
    >>> from pippy.runtime.stage import Stage
    >>> stage = Stage(pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),)), 0)
    >>> sorted(stage.state_dict())
    ['bias', 'weight']
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import torch
from torch import fx, nn
from torch.nn.parallel import DistributedDataParallel

from pippy.frontend.compiled import compiled_inner
from pippy.frontend.graphpickle import graph_from_state, graph_state
from pippy.frontend.materialize import replace_meta
from pippy.frontend.modebranch import warn_idle
from pippy.frontend.outline import OutlineError, outline
from pippy.frontend.params import is_lifted_constant
from pippy.frontend.retarget import retarget_devices
from pippy.frontend.split import StageInfo
from pippy.frontend.trainmode import effective_modes, mode_signature, sync

__all__ = ["StageModule", "materialize_module"]


def materialize_module(module: fx.GraphModule, device: torch.device, index: int,
                       traced: torch.device | None = None) -> tuple[fx.GraphModule, fx.Graph]:
    """A copy of ``module`` on ``device`` with its own parameters (aliasing inside it kept), structured like the model.

    Meta tensors (a model built under ``torch.device("meta")``) become NaN placeholders on
    ``device``: fill them with ``pippy.frontend.materialize.materialize_stage``. Device constants
    of ``traced`` (the device the pipe was traced on, see :mod:`pippy.frontend.retarget`) and of
    ``meta`` in the graphs become ``device``. The copy has the
    original submodules under their original FQNs (see :mod:`pippy.frontend.outline`); a graph
    whose structure cannot be rebuilt runs flat, with a warning. Also returns the flat graph.
    """
    mod = copy.deepcopy(module)  # a KeepBuffersGraphModule (frontend/keepbuffers.py): non-persistent buffers stay so
    replace_meta(mod, device)
    if traced is not None:  # before outlining: the outlined graphs copy the flat graph's nodes
        retarget_devices(mod, [traced], device)
    mod = mod.to(device)
    try:
        return outline(mod), mod.graph
    except Exception as err:  # an OutlineError, or a failure the outliner did not foresee: the flat graph still runs
        why = str(err) if isinstance(err, OutlineError) else f"rebuilding its module tree failed ({type(err).__name__}: {err})"
        warnings.warn(f"stage {index} runs as one flat graph, so hooks on its blocks (fully_shard, parallelize_module, "
                      f"checkpoint wrappers) will not fire: {why}", stacklevel=4)
        return mod, mod.graph


_SUBMOD_GRAPH = "pippy: the flat graph is submod's own"


class StageModule:
    """The module side of a stage (mixed into :class:`~pippy.runtime.stage.Stage`, which sets these attributes)."""

    index: int
    info: StageInfo
    submod: Any  # the outlined GraphModule, or a DDP wrapper of it, or a hand-cut module
    rank_hint: int | None
    _flat_graph: fx.Graph | None
    _state: dict[int, Any]
    _taps: Any
    _mode_sig: tuple[bool, ...] | None
    _written: frozenset[int] | None  # the inputs the graph writes in place (see pippy.frontend.mutation)

    def __getstate__(self) -> dict[str, Any]:
        """The stage's state for pickling: its flat graph as data (an ``fx.Graph`` does not pickle), or a note that
        it is :attr:`submod`'s own graph (kept one object on loading)."""
        state = dict(self.__dict__)
        flat = state.get("_flat_graph")
        if isinstance(flat, fx.Graph):
            same = getattr(state.get("_modules", {}).get("submod"), "graph", None) is flat
            state["_flat_graph"] = _SUBMOD_GRAPH if same else graph_state(flat)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        flat = state.get("_flat_graph")
        if flat is _SUBMOD_GRAPH or flat == _SUBMOD_GRAPH:
            state["_flat_graph"] = state["_modules"]["submod"].graph
        elif flat is not None and not isinstance(flat, fx.Graph):
            state["_flat_graph"] = graph_from_state(flat)
        nn.Module.__setstate__(self, state)  # type: ignore[arg-type]

    def flat_module(self) -> fx.GraphModule:
        """The stage as one flat graph over :attr:`submod`'s own tensors (what split backward taps).

            >>> import torch
            >>> from pippy import pipeline
            >>> from pippy.runtime.stage import Stage
            >>> stage = Stage(pipeline(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1, (torch.ones(1, 2),)), 0)
            >>> stage.flat_module().get_parameter("0.weight") is stage.submod.get_parameter("0.weight")
            True
        """
        sub = self.submod
        if self._flat_graph is None or not isinstance(sub, fx.GraphModule) or sub.graph is self._flat_graph:
            return sub
        return fx.GraphModule(sub, self._flat_graph, class_name=type(self.info.module).__name__)

    def follow_modes(self) -> bool:
        """Make the stage's traced graphs follow its modules' train / eval flags (see :mod:`pippy.frontend.trainmode`).

        Run before every forward; cheap when no flag changed since the last call, and put off
        while micro-batches are in flight. Returns whether a graph changed.

            >>> import torch
            >>> from pippy import pipeline
            >>> from pippy.runtime.stage import Stage
            >>> stage = Stage(pipeline(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()), 1,
            ...                        (torch.ones(1, 2),)), 0)
            >>> _ = stage.submod.eval()
            >>> stage.follow_modes(), [n.args[2] for n in stage.flat_module().graph.find_nodes(
            ...     op="call_function", target=torch.ops.aten.dropout.default)]
            (True, [False])
        """
        if self._flat_graph is None or self._state:  # a hand-cut stage follows its modes itself
            return False
        root = self.unwrapped
        sig = mode_signature(root)
        if sig == self._mode_sig:
            return False
        self._mode_sig = sig
        flat = [] if self._flat_graph is root.graph else [SimpleNamespace(graph=self._flat_graph)]
        changed = sync(root, flat)  # the tree's graphs, and the flat graph that split backward copies
        pipe = getattr(self, "pipe", None)
        idle, traced = getattr(pipe, "idle_branches", None), getattr(pipe, "traced_modes", None)
        if idle and traced is not None:  # drop path traced in eval mode, now in train mode: warned once per pipe
            warn_idle(effective_modes(root, traced), idle, pipe.__dict__.setdefault("_warned_idle", set()))
        if changed:  # a dropout switched to eval returns its input: a write into its result writes the input
            self._taps, self._written = None, None
        return changed

    @property
    def unwrapped(self) -> nn.Module:
        """:attr:`submod` under the model's FQNs: the module inside a ``DistributedDataParallel`` or
        ``torch.compile`` wrapper (``stage.submod = torch.compile(stage.submod)``), however nested.

            >>> import torch
            >>> from pippy import pipeline
            >>> from pippy.runtime.stage import Stage
            >>> stage = Stage(pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),)), 0)
            >>> stage.unwrapped is stage.submod
            True
        """
        sub = self.submod
        while True:
            inner = sub.module if isinstance(sub, DistributedDataParallel) else compiled_inner(sub)
            if inner is None:  # (by type: a model's own child named _orig_mod is no wrapper)
                return sub
            sub = inner

    def parameters(self) -> Iterator[nn.Parameter]:
        """This stage's parameters (for an optimizer)."""
        return self.submod.parameters()

    def state_dict(self, *, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]:
        """This stage's state, keyed by the original model's FQNs (export's lifted constants left out); ``prefix`` and
        ``keep_vars`` as for ``nn.Module.state_dict``."""
        return {prefix + k: v for k, v in self.unwrapped.state_dict(keep_vars=keep_vars).items()
                if not is_lifted_constant(k)}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load this stage's tensors by the original model's FQNs (what :meth:`state_dict` gives); returns
        ``nn.Module.load_state_dict``'s missing / unexpected keys (export's lifted constants never count missing).
        ``assign=True`` makes the given tensors the stage's own (as ``nn.Module.load_state_dict``); an optimizer built
        before then still holds the old ones.

            >>> import torch
            >>> from pippy import pipeline
            >>> from pippy.runtime.stage import Stage
            >>> stage = Stage(pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),)), 0)
            >>> stage.load_state_dict({"weight": torch.eye(2), "bias": torch.zeros(2)})
            <All keys matched successfully>
        """
        res = self.unwrapped.load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in res.missing_keys if not is_lifted_constant(k)]
        if strict and (missing or res.unexpected_keys):
            raise RuntimeError(
                f"stage {self.index}: load_state_dict expected this stage's keys (stage.state_dict()); missing "
                f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected {res.unexpected_keys[:6]}"
                f"{' ...' if len(res.unexpected_keys) > 6 else ''}. Pass strict=False to load a full model's state "
                "dict into one stage"
            )
        res.missing_keys[:] = missing
        return res

    def where(self, mb: int, action: str) -> str:
        """Names this stage, its rank, micro-batch ``mb`` and the action, for messages."""
        rank = "?" if self.rank_hint is None else str(self.rank_hint)
        return f"stage {self.index} (rank {rank}), micro-batch {mb}, action {self.index}{action}{mb}"

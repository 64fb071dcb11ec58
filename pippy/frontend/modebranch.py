"""Python branches on ``self.training`` that a traced graph cannot switch: the random ops they left, the modules they emptied.

``torch.export`` takes a ``forward``'s ``if self.training`` once, at the trace. :mod:`pippy.frontend.trainmode`
switches the mode constants of dropout, batch norm and attention, but not such a branch: timm's ``DropPath`` or
torchvision's ``StochasticDepth`` traced in train mode keep drawing (``bernoulli_``) after ``.eval()``, and traced in
eval mode they ran no op at all, so they never drop in train mode. This module finds both and warns once per module.

    >>> import torch
    >>> from torch import nn
    >>> from pippy import pipeline
    >>> class DropPath(nn.Module):
    ...     def forward(self, x):
    ...         return x if not self.training else x * torch.rand(x.shape[0], 1).ge(0.1) / 0.9
    >>> pipe = pipeline(nn.Sequential(nn.Linear(2, 2), DropPath()), 1, (torch.ones(2, 2),))
    >>> list(unswitched_random(pipe.get_stage_module(0).graph, {"": False}, pipe.traced_modes))
    ['1']
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Mapping
from typing import Any

from torch import fx, nn

from pippy.frontend.notice import warn_user
from pippy.frontend.trace import model_line

__all__ = ["idle_branches", "is_random", "lookup_mode", "node_owner", "op_name", "strip_suffix", "unswitched_random",
           "warn_idle", "warn_unswitched"]

_SUFFIX = re.compile(r"@\d+$")
_RANDOM = frozenset({"bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like", "randint", "randint_like",
                     "uniform_", "normal_", "normal", "exponential_", "geometric_", "log_normal_", "cauchy_",
                     "multinomial", "randperm", "poisson"})  # drawn by the model's own code, not a dropout op


def strip_suffix(name: str) -> str:
    """A module FQN without the ``@k`` suffix torch.export gives the k-th call of a module called again.

        >>> strip_suffix("layers.0@1"), strip_suffix("layers.0")
        ('layers.0', 'layers.0')
    """
    return _SUFFIX.sub("", name)


def op_name(node: fx.Node) -> str:
    """The aten op's name without overload: ``dropout`` for ``aten.dropout.default``; '' for anything but an aten call."""
    parts = str(node.target).split(".")
    return parts[1] if node.op == "call_function" and len(parts) >= 2 and parts[0] == "aten" else ""


def is_random(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers by the model's own code (``bernoulli_``, ``rand``; not a dropout op).

        >>> import torch
        >>> from pippy.frontend.trace import export_module
        >>> class Noise(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x + torch.randn_like(x)
        >>> [is_random(n) for n in export_module(Noise(), (torch.ones(2),)).module().graph.nodes
        ...  if n.op == "call_function" and n.target is not torch.ops.aten.add.Tensor]
        [True]
    """
    return op_name(node) in _RANDOM


def node_owner(node: fx.Node) -> str:
    """The FQN of the innermost model module that ran ``node`` ('' for the model itself).

        >>> import torch
        >>> from pippy import pipeline
        >>> from pippy.frontend.trainmode import mode_args
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> gm = pipeline(net, 1, (torch.ones(4, 2),)).get_stage_module(0)
        >>> sorted({node_owner(a.node) for a in mode_args(gm.graph)})
        ['1']
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return strip_suffix(str(list(stack.values())[-1][0]))


def lookup_mode(modes: Mapping[str, bool], fqn: str) -> bool | None:
    """The flag of ``fqn`` in ``modes``, else of its nearest ancestor there; None when none is.

        >>> lookup_mode({"": True, "a": False}, "a.b"), lookup_mode({}, "a")
        (False, None)
    """
    while True:
        if fqn in modes:
            return modes[fqn]
        if not fqn:
            return None
        fqn = fqn.rpartition(".")[0]


def unswitched_random(graph: fx.Graph, now: Mapping[str, bool], traced_modes: Mapping[str, bool],
                      root: nn.Module | None = None) -> dict[str, str]:
    """The random ops of ``graph`` whose module is no longer in its traced mode, by module FQN: the op and the
    model's line. A Python ``if self.training`` branch chose them at the trace, and no constant switches them.
    Only modules whose ``forward`` reads their mode count (their class is read from ``root``, else from the name
    the trace recorded).

        >>> import torch
        >>> from pippy import pipeline
        >>> class DropPath(torch.nn.Module):
        ...     def forward(self, x):
        ...         if not self.training:
        ...             return x
        ...         return x * x.new_empty(x.shape[0], 1).bernoulli_(0.9) / 0.9
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), DropPath())
        >>> pipe = pipeline(net, 1, (torch.ones(2, 2),))
        >>> found = unswitched_random(pipe.get_stage_module(0).graph, {"": False}, pipe.traced_modes)
        >>> list(found), found["1"].split(" at ")[0]
        (['1'], 'bernoulli_')
    """
    out: dict[str, str] = {}
    for node in graph.nodes:
        if not is_random(node):
            continue
        fqn = node_owner(node)
        training, was = lookup_mode(now, fqn), lookup_mode(traced_modes, fqn)
        if training is not None and was is not None and training != was and _branches_on_mode(node, fqn, root):
            out.setdefault(fqn, f"{op_name(node)} at {model_line(node) or node.name}")
    return out


@functools.cache
def _forward_reads_mode(cls: Any) -> bool:
    try:
        return "training" in inspect.getsource(cls.forward)
    except (OSError, TypeError, AttributeError):
        return True  # no source to read: it may branch


def _branches_on_mode(node: fx.Node, fqn: str, root: nn.Module | None) -> bool:
    """Whether the module that ran ``node`` reads its mode in ``forward`` (a random op of a module that never does,
    a VAE's sampling, draws in both modes alike)."""
    stack = node.meta.get("nn_module_stack") or {}
    name = list(stack.values())[-1][1] if stack else None
    held: Any = type(_held(root, fqn))  # the model's own class, unless the stage holds a stand-in (outlined graph)
    if isinstance(name, str) and name.rsplit(".", 1)[-1] == held.__qualname__.rsplit(".", 1)[-1]:
        return _forward_reads_mode(held)
    cls = _class(name)
    return not isinstance(cls, type) or _forward_reads_mode(cls)


def _held(root: nn.Module | None, fqn: str) -> nn.Module | None:
    """The module ``root`` holds at ``fqn`` (a stage holds those that own tensors), or None."""
    if root is None:
        return None
    try:
        return root.get_submodule(fqn)
    except AttributeError:
        return None


@functools.cache
def _class(name: Any) -> Any:
    """The class an ``nn_module_stack`` entry names (``'pkg.mod.Cls'``, or the class itself), or None."""
    if not isinstance(name, str):
        return name
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        obj = sys.modules.get(".".join(parts[:cut]))
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        if isinstance(obj, type):
            return obj
    return None


def idle_branches(model: nn.Module, graph: fx.Graph) -> dict[str, str]:
    """The modules of ``model`` traced in eval mode that ran no op of ``graph`` although their ``forward`` reads
    ``self.training`` (not torch's own layers, whose modes the graph keeps): a drop path traced in eval mode returned
    its input, so in train mode it still does. FQN -> class name.

        >>> import torch
        >>> from torch import nn
        >>> from pippy.frontend.trace import export_module
        >>> class DropPath(nn.Module):
        ...     def forward(self, x):
        ...         return x if not self.training else x * torch.rand(x.shape[0], 1).ge(0.1) / 0.9
        >>> net = nn.Sequential(nn.Linear(2, 2), DropPath(), nn.Dropout()).eval()
        >>> idle_branches(net, export_module(net, (torch.ones(2, 2),)).module().graph)
        {'1': 'DropPath'}
    """
    ran = {strip_suffix(str(fqn)) for n in graph.nodes for fqn, _ in (n.meta.get("nn_module_stack") or {}).values()}
    return {fqn: type(m).__name__ for fqn, m in model.named_modules()
            if fqn and not m.training and fqn not in ran and not type(m).__module__.startswith("torch.nn.")
            and _reads_mode_of(m)}


def _reads_mode_of(module: nn.Module) -> bool:
    cls: Any = type(module)
    return _forward_reads_mode(cls)


def warn_idle(now: Mapping[str, bool], idle: Mapping[str, str] | None, warned: set[str]) -> None:
    """Warn about the :func:`idle_branches` that ``now`` (modules' flags) has in train mode, once per module:
    ``warned`` holds those already told (one set per pipe)."""
    found = [fqn for fqn in (idle or {}) if lookup_mode(now, fqn) and fqn not in warned]
    if not found:
        return
    warned.update(found)
    found = [f"{fqn} ({(idle or {})[fqn]})" for fqn in found]
    warn_user(
        f"pipeline: modules traced in eval mode ran no op, and their forward branches on self.training: "
        f"{', '.join(found[:3])}{' ...' if len(found) > 3 else ''}. They are in train mode now, but the traced graph "
        "keeps what eval mode did (a drop path returns its input), so training differs from the model's. How to fix: "
        "trace the pipe with the model in train mode (pipeline(model.train(), ...); a Hugging Face from_pretrained "
        "model starts in eval mode)"
    )


def warn_unswitched(root: nn.Module, owners: list[Any], now: Mapping[str, bool],
                     traced_modes: Mapping[str, bool]) -> None:
    """Warn once per module about :func:`unswitched_random`'s ops in ``owners``' graphs."""
    found: dict[str, str] = {}
    for holder in owners:
        for fqn, what in unswitched_random(holder.graph, now, traced_modes, root).items():
            warned = root.__dict__.setdefault("_pippy_warned_random", set())  # once per module and op, per stage
            if f"{fqn}:{what}" not in warned:
                warned.add(f"{fqn}:{what}")
                found.setdefault(fqn, what)
    if not found:
        return
    mode = "eval" if not lookup_mode(now, next(iter(found))) else "train"
    where = "; ".join(f"{fqn or 'the model'}: {what}" for fqn, what in list(found.items())[:3])
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    warn_user(
        f"pipeline: modules switched to {mode} mode draw random numbers their traced mode drew: {where}{more}. A "
        "Python branch on self.training (drop path / stochastic depth, noise) was taken once, when the pipe was "
        "traced, and pippy can switch only dropout, batch norm and attention dropout in the graph, so these ops "
        f"still run in {mode} mode and outputs differ from the model's. How to fix: for {mode}, use a pipe traced "
        f"with the model in {mode} mode (pipeline(model.{mode}(), ...); load this stage's state_dict() into its "
        "stage), or set the model's rate to 0 (drop_path_rate=0) before tracing if it is not needed"
    )

"""Train / eval mode in traced graphs: dropout, batch norm and their kin follow each module's ``training`` flag again.

``torch.export`` writes the mode into the graph as a constant: ``dropout(x, 0.5, True)``,
``batch_norm(..., True, 0.1, 1e-5, ...)`` and the ``num_batches_tracked += 1`` of a batch norm in
training. :func:`follow_modes` rewrites those constants in place so that each op runs as its own
module (its ``nn_module_stack`` owner) would in its current mode: when a module is in the mode it
was traced in, its ops keep their traced constants exactly (so a model traced with some blocks
in eval mode keeps them so); when its mode differs, the ops take that mode's value (eval: no
dropout, running statistics, no count; train: the reverse).

Some switches are beyond the graph, and are left as traced: a batch norm traced in eval mode has
no ``num_batches_tracked`` count to resume in train mode (it matters only with ``momentum=None``),
attention traced in eval mode was given ``dropout_p=0`` by the model, so it stays without
dropout in train mode, and a Python branch on ``self.training`` (timm's ``DropPath``, torchvision's
``StochasticDepth``, an MoE router's jitter) was taken once, at the trace. A random op such a branch
left in the graph (``bernoulli_``, ``rand``, ``uniform_``) of a module switched out of its traced
mode is warned about, once per module (a branch that left nothing, drop path traced in eval mode, is not seen;
nor is a module that draws in both modes told apart from one that branches, when its ``forward`` reads
``self.training`` for a dropout too). Trace the pipe from the model in the mode it mostly runs in.

    >>> import torch
    >>> from torch import nn
    >>> from pippy import pipeline
    >>> net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    >>> gm = pipeline(net, 1, (torch.ones(2, 3),)).get_stage_module(0)
    >>> x = torch.ones(2, 3)
    >>> _ = gm.eval()
    >>> follow_modes(gm, [gm], {"": True})
    True
    >>> torch.equal(gm(x)[0], net[0](x))
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from pippy.frontend.modebranch import lookup_mode, node_owner, op_name, strip_suffix, warn_unswitched

__all__ = ["ModeArg", "effective_modes", "follow_modes", "keep_following", "mode_args", "mode_signature",
           "module_modes", "node_owner", "set_modes", "sync"]  # node_owner: its home before modebranch

_DROPOUTS = ("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "native_dropout")
_SDPA = "scaled_dot_product_attention"
_KEY = "pippy_traced_arg"  # node.meta: (index, kwarg name, traced value) of the rewritten argument


@dataclass(frozen=True, slots=True)
class ModeArg:
    """One mode-dependent argument of a graph node: where it sits and its value in each mode.

    ``index`` / ``name``: its position and keyword name; ``traced``: the value the trace wrote;
    ``on_eval`` / ``on_train``: the value in that mode.

        >>> import torch
        >>> from pippy import pipeline
        >>> gm = pipeline(torch.nn.Dropout(0.2), 1, (torch.ones(1, 2),)).get_stage_module(0)
        >>> arg = mode_args(gm.graph)[0]
        >>> arg.name, arg.traced, arg.on_eval, arg.on_train
        ('train', True, False, True)
    """

    node: fx.Node
    index: int
    name: str
    traced: Any
    on_eval: Any
    on_train: Any


def _current(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _traced(node: fx.Node, index: int, name: str, default: Any) -> Any:
    saved = node.meta.get(_KEY)
    return saved[2] if saved is not None else _current(node, index, name, default)


def mode_args(graph: fx.Graph) -> list[ModeArg]:
    """The mode-dependent arguments of ``graph``'s nodes.

        >>> import torch
        >>> from pippy import pipeline
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Dropout(0.1))
        >>> gm = pipeline(net, 1, (torch.ones(4, 2),)).get_stage_module(0)
        >>> [(a.node.target.__name__, a.name, a.traced) for a in mode_args(gm.graph)]
        [('add_.Tensor', 'other', 1), ('batch_norm.default', 'training', True), ('dropout.default', 'train', True)]
    """
    out: list[ModeArg] = []
    for node in graph.nodes:
        op = op_name(node)
        if op in _DROPOUTS:
            out.append(ModeArg(node, 2, "train", _traced(node, 2, "train", None), False, True))
        elif op in ("batch_norm", "instance_norm") and _current(node, 3, "running_mean", None) is not None:
            name = "training" if op == "batch_norm" else "use_input_stats"
            out.append(ModeArg(node, 5, name, _traced(node, 5, name, True), False, True))
        elif op == "rrelu":
            out.append(ModeArg(node, 3, "training", _traced(node, 3, "training", False), False, True))
        elif op == _SDPA:
            p = _traced(node, 4, "dropout_p", 0.0)
            out.append(ModeArg(node, 4, "dropout_p", p, 0.0, p))  # traced in eval: p is 0, and stays so
        elif op == "add_" and node.args and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr" \
                and str(node.args[0].target).endswith("num_batches_tracked"):
            out.append(ModeArg(node, 1, "other", _traced(node, 1, "other", 1), 0, _traced(node, 1, "other", 1)))
    return out


def module_modes(root: nn.Module) -> dict[str, bool]:
    """Each submodule's ``training`` flag by FQN ('' for ``root``), as :func:`follow_modes` reads them."""
    return {strip_suffix(name): mod.training for name, mod in root.named_modules(remove_duplicate=False)}


def effective_modes(root: nn.Module, traced_modes: Mapping[str, bool]) -> dict[str, bool]:
    """Every traced module's flag now, by FQN: its own in ``root``, or, for a module ``root`` does not
    hold (a stage's flat graph keeps only the modules that own tensors), its traced flag while its
    nearest held ancestor is in its traced mode, else that ancestor's flag (as ``.eval()`` recurses).

        >>> from torch import nn
        >>> flat = nn.Module()                          # holds no "drop" module
        >>> effective_modes(flat, {"": True, "drop": False})
        {'': True, 'drop': False}
        >>> effective_modes(flat.eval(), {"": True, "drop": False})
        {'': False, 'drop': False}
    """
    now = module_modes(root)
    out = dict(now)
    for name, flag in traced_modes.items():
        if name in now:
            continue
        anc = name
        while anc and anc not in now:
            anc = anc.rpartition(".")[0]
        if anc in now:
            out[name] = flag if now[anc] == traced_modes.get(anc, now[anc]) else now[anc]
    return out


def follow_modes(root: nn.Module, owners: Iterable[Any], traced_modes: Mapping[str, bool]) -> bool:
    """Rewrite the mode constants of the graphs held by ``owners`` to follow the modules of ``root``.

    ``owners``: ``GraphModule``\\ s / ``InterpreterModule``\\ s whose graphs to rewrite (changed
    ones are recompiled); ``traced_modes``: every module's flag when traced (FQN -> bool, '' the
    model's), from :func:`module_modes` of the traced model. A node's mode is its owner module's
    in ``root`` (or the nearest ancestor's). Returns whether any graph changed.
    """
    now = effective_modes(root, traced_modes)
    any_changed = False
    owners = list(owners)
    warn_unswitched(root, owners, now, traced_modes)
    for holder in owners:
        changed = False
        for arg in mode_args(holder.graph):
            fqn = node_owner(arg.node)
            training = lookup_mode(now, fqn)
            was = lookup_mode(traced_modes, fqn)
            if training is None or was is None:
                continue
            want = arg.traced if training == was else (arg.on_train if training else arg.on_eval)
            if _current(arg.node, arg.index, arg.name, arg.traced) == want:
                continue
            arg.node.meta.setdefault(_KEY, (arg.index, arg.name, arg.traced))
            if arg.name in arg.node.kwargs:
                arg.node.update_kwarg(arg.name, want)
            elif len(arg.node.args) > arg.index:
                arg.node.update_arg(arg.index, want)
            else:
                arg.node.update_kwarg(arg.name, want)
            changed = True
        if changed:
            _recompile(holder)
            any_changed = True
    return any_changed


def _recompile(holder: Any) -> None:
    if isinstance(holder, fx.GraphModule):
        holder.recompile()
        traced = holder.__dict__.get("_pippy_traced_modes")
        if traced is not None:  # recompile() may have put a new call in front (a class FSDP swapped in)
            keep_following(holder, traced)
    elif hasattr(holder, "finalize"):  # torch.export's InterpreterModule: regenerate its code
        holder.finalize()


def mode_signature(root: nn.Module) -> tuple[bool, ...]:
    """Every module's ``training`` flag under ``root``, in order: a change means the graphs need :func:`follow_modes`."""
    return tuple(m.training for m in root.modules())


def set_modes(root: nn.Module, modes: Mapping[str, bool]) -> None:
    """Set each module under ``root`` to its flag in ``modes`` (by FQN, else its nearest ancestor's).

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(1, 1), nn.Sequential(nn.Dropout()))
        >>> set_modes(net, {"": True, "1": False})
        >>> [m.training for m in net.modules()]
        [True, True, False, False]
    """
    for name, mod in root.named_modules(remove_duplicate=False):
        flag = lookup_mode(modes, strip_suffix(name))
        if flag is not None:
            mod.training = flag


def keep_following(module: fx.GraphModule, traced_modes: Mapping[str, bool]) -> None:
    """Make ``module``'s traced graphs follow its modules' flags on every call (see :func:`sync`).

    The check runs before ``nn.Module.__call__`` picks the forward to run, so the very first call
    after ``.eval()`` already runs the rewritten code (a forward pre-hook would come too late).

        >>> import torch
        >>> from pippy import pipeline
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
        >>> gm = pipeline(net, 1, (torch.ones(1, 2),)).get_stage_module(0)   # pipeline() already did this
        >>> x = torch.ones(3, 2)
        >>> torch.equal(gm.eval()(x)[0], net[0](x))
        True
    """
    module.__dict__["_pippy_traced_modes"] = dict(traced_modes)
    cls = type(module)  # fx gives every GraphModule its own class; recompile() keeps a _wrapped_call it finds
    wrapped = vars(cls).get("_wrapped_call")
    if wrapped is None:  # not a GraphModule torch.fx compiled: its calls are not checked (stages still sync)
        return
    if not isinstance(wrapped, _SyncFirst):
        cls._wrapped_call = _SyncFirst(wrapped)  # type: ignore[attr-defined]


class _SyncFirst:
    """A GraphModule's call: :func:`sync` the module, then the call fx made (``nn.Module.__call__``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, obj: nn.Module, *args: Any, **kwargs: Any) -> Any:
        sync(obj)
        return self.inner(obj, *args, **kwargs)


def sync(module: nn.Module, extra: Iterable[Any] = ()) -> bool:
    """Rewrite the graphs under ``module`` (and those held by ``extra``) when a flag changed since the last call.

    Needs :func:`keep_following` first (else does nothing). The graphs are those of every module
    under ``module`` that has one, plus the hidden repeat calls an outlined stage keeps off its tree.
    Returns whether a graph changed.
    """
    traced = module.__dict__.get("_pippy_traced_modes")
    if traced is None:
        return False
    sig = mode_signature(module)
    extra = list(extra)
    if sig == module.__dict__.get("_pippy_mode_sig") and not extra:
        return False
    module.__dict__["_pippy_mode_sig"] = sig
    holders: list[Any] = [m for m in module.modules() if isinstance(getattr(m, "graph", None), fx.Graph)]
    holders += module.__dict__.get("_pippy_hidden_calls", [])
    return follow_modes(module, [*holders, *extra], traced)

"""Give a flat stage graph back the model's structure: one module per original submodule, each one's forward runs.

A traced stage is one flat graph that reads every parameter directly, so a hook on a block
(FSDP2's ``fully_shard``, DDP, tensor parallelism, activation checkpointing, a user's own hook)
would never fire. :func:`outline` rebuilds the module tree from the ``nn_module_stack`` that
``torch.export`` records on every node, using ``torch.export.unflatten``'s own outliner: each
original submodule becomes an ``InterpreterModule`` under its original FQN that owns its
parameters and buffers, and its graph runs when the stage runs. Results are the same numbers.

    >>> import torch
    >>> from pippy import pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(3, 1)))
    >>> flat = pipeline(net, 1, (torch.ones(2, 3),)).stage_infos[0].module
    >>> tree = outline(flat)
    >>> [name for name, _ in tree.named_children()], [name for name, _ in tree.get_submodule("1").named_children()]
    (['0', '1'], ['0', '1'])
    >>> calls = []
    >>> _ = tree.get_submodule("1.1").register_forward_hook(lambda *a: calls.append("1.1"))
    >>> x = torch.randn(2, 3)
    >>> torch.equal(tree(x)[0], flat(x)[0]), calls
    (True, ['1.1'])
"""

from __future__ import annotations

import copy
import keyword
import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.export.unflatten import InterpreterModule, _ModuleFrame

from pippy.frontend.graphpickle import OutlinedModule
from pippy.frontend.keepbuffers import KeepBuffersGraphModule
from pippy.frontend.unread import ensure_path

__all__ = ["Blocks", "OutlineError", "outline"]

_CALL_SUFFIX = re.compile(r"@\d+")


class OutlineError(RuntimeError):
    """The graph's module structure could not be rebuilt (the stage then runs its flat graph)."""


def _stack(node: fx.Node) -> list[tuple[str, Any]]:
    return list((node.meta.get("nn_module_stack") or {}).items())


def _root_entry(graph: fx.Graph) -> tuple[str, Any]:
    for node in graph.nodes:
        for key, val in _stack(node):
            if val[0] == "":
                return key, val
    return "L__self__", ("", None)


def _prepare(graph: fx.Graph) -> None:
    """Give every node a module stack that starts at the root; put each attribute read inside its owner."""
    root = _root_entry(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    last: list[tuple[str, Any]] = [root]
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        st = _stack(node)
        if not st:
            st = last  # a node pippy added: it belongs where the previous node ran
        elif st[0][1][0] != "":
            st = [root, *st]
        node.meta["nn_module_stack"] = dict(st)
        last = st
    nodes = list(graph.nodes)
    first = next((n for n in nodes if n.op not in ("placeholder", "get_attr")), None)
    if first is None:
        return
    before: dict[fx.Node, list[tuple[int, fx.Node]]] = defaultdict(list)
    for node in [n for n in nodes if n.op == "get_attr"]:
        users = sorted(node.users, key=order.__getitem__)
        st = (_stack(users[0]) if users else []) or [root]  # an attribute only returned (sent on) reads at the top
        owner = str(node.target).rpartition(".")[0]
        # the deepest module of the reader's stack that owns the tensor or holds its owner: the read
        # runs inside that module's call, after its pre-forward hooks (an FSDP2 unshard)
        k = max(i for i, (_, (path, _)) in enumerate(st) if not path or owner == path or owner.startswith(path + "."))
        node.meta["nn_module_stack"] = dict(st[: k + 1])
        if k == 0:
            before[first].append((0, node))
            continue
        key, at = st[k][0], order[users[0]]
        while at > 0 and (nodes[at - 1].op == "get_attr" or key in (nodes[at - 1].meta.get("nn_module_stack") or {})):
            at -= 1  # back to the first node of that call (attribute reads are being moved: skip them)
        while nodes[at].op == "get_attr":
            at += 1
        before[nodes[at]].append((k, node))
    for anchor, reads in before.items():
        for _, node in sorted(reads, key=lambda r: r[0]):  # outer modules' reads first: no call is cut in two
            anchor.prepend(node)


def _adopt_orphans(root: nn.Module) -> None:
    """A module whose first call ran in an earlier stage, or inside a no_grad / autocast region (a subgraph the
    outliner does not enter), appears as ``name@k``: give it its own name."""
    everything = list(root.modules())
    for parent in everything:
        for name in [n for n in parent._modules if _CALL_SUFFIX.search(n)]:
            base = _CALL_SUFFIX.sub("", name)
            if base not in parent._modules:
                mod = parent._modules.pop(name)
                parent._modules[base] = mod
                for holder in everything:  # every call of the parent shares its children: each graph calls ``name``
                    if holder._modules is parent._modules:
                        object.__setattr__(holder, name, mod)


def _set_path(root: nn.Module, fqn: str, tensor: torch.Tensor, persistent: bool) -> None:
    *parents, leaf = fqn.split(".")
    mod = ensure_path(root, parents)
    if isinstance(tensor, nn.Parameter):
        mod.register_parameter(leaf, tensor)
    else:
        mod.register_buffer(leaf, tensor, persistent=persistent)


def _owned_tensors(flat: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    out: list[tuple[str, torch.Tensor, bool]] = []
    for prefix, mod in flat.named_modules(remove_duplicate=False):
        pre = f"{prefix}." if prefix else ""
        for name, p in mod._parameters.items():
            if p is not None:
                out.append((pre + name, p, True))
        for name, b in mod._buffers.items():
            if b is not None:
                out.append((pre + name, b, name not in mod._non_persistent_buffers_set))
    return out


def _graph_attrs(flat: fx.GraphModule) -> list[tuple[str, nn.Module]]:
    """Modules the flat graph reads as attributes (the subgraphs of higher-order ops), by path."""
    out = []
    for node in flat.graph.nodes:
        if node.op == "get_attr":
            obj: Any = flat
            for part in str(node.target).split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, nn.Module):
                out.append((str(node.target), obj))
    return out


class Blocks(nn.Module):  # type: ignore[misc]
    """A container the stage never calls (``model.layers``): its children by name or index, in order.

        >>> b = Blocks(); b.add_module("2", torch.nn.Tanh()); b.add_module("3", torch.nn.ReLU())
        >>> len(b), type(b[3]).__name__, [type(m).__name__ for m in b]
        (2, 'ReLU', ['Tanh', 'ReLU'])
    """

    def __getitem__(self, key: int | str) -> nn.Module:
        """The child named ``key`` (``layers[2]`` is block 2 of the original model, not the third child)."""
        mod = self._modules.get(str(key))
        if mod is None:
            raise KeyError(f"this stage holds no submodule {key!r}; it holds {list(self._modules)}")
        return mod

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.children())

    def __len__(self) -> int:
        return len(self._modules)


def _containers(root: nn.Module) -> None:
    """Swap the outliner's never-called holders (empty graphs) for :class:`Blocks`."""
    for parent in list(root.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, InterpreterModule) and not len(child.graph.nodes):
                holder = Blocks()
                holder._modules = child._modules
                holder._parameters = child._parameters
                holder._buffers = child._buffers
                holder._non_persistent_buffers_set = child._non_persistent_buffers_set
                for key, val in vars(child).items():
                    if _CALL_SUFFIX.search(key):  # an adopted module's call name
                        object.__setattr__(holder, key, val)
                parent._modules[name] = holder


_LINEAR_TY = "torch.nn.modules.linear.Linear"


def _as_linear(mod: nn.Module) -> nn.Linear | None:
    """An ``nn.Linear`` over ``mod``'s own tensors when ``mod`` is a traced ``Linear`` that only runs ``linear(x, w, b)``."""
    if not isinstance(mod, InterpreterModule) or getattr(mod, "_ty", None) != _LINEAR_TY or mod._modules:
        return None
    nodes = list(mod.graph.nodes)
    ops = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    ins = [n for n in nodes if n.op == "placeholder"]
    attrs = {str(n.target): n for n in nodes if n.op == "get_attr"}
    weight = mod._parameters.get("weight")
    if len(ins) != 1 or len(ops) != 1 or set(attrs) - {"weight", "bias"} or "weight" not in attrs or weight is None:
        return None
    op, out = ops[0], nodes[-1]
    want = (ins[0], attrs["weight"], *((attrs["bias"],) if "bias" in attrs else ()))
    if str(op.target) != "aten.linear.default" or tuple(op.args) != want or op.kwargs or out.args[0] is not op:
        return None
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = int(weight.shape[1]), int(weight.shape[0])
    lin._parameters = mod._parameters
    if "bias" not in lin._parameters:
        lin.register_parameter("bias", None)
    return lin


def _real_linears(root: nn.Module) -> None:
    """Traced ``nn.Linear`` leaves become real ``nn.Linear`` modules (same tensors): tensor parallel plans need them."""
    mods = list(root.modules())
    aliased = {id(v) for m in mods for k, v in vars(m).items() if _CALL_SUFFIX.search(k)}  # called as ``name@k``
    for parent in mods:
        for name, child in list(parent._modules.items()):
            lin = _as_linear(child) if child is not None and id(child) not in aliased else None
            if lin is not None:
                parent._modules[name] = lin


def outline(flat: fx.GraphModule) -> fx.GraphModule:
    """A module with ``flat``'s inputs, outputs and tensors, structured like the traced model.

    The root is a ``GraphModule``; every original submodule the graph calls is an
    ``InterpreterModule`` (an :class:`~pippy.frontend.graphpickle.OutlinedModule`, which pickles; run
    by generated code) at its original FQN, holding the very same
    parameter and buffer objects as ``flat``; a ``Linear`` whose traced graph is just
    ``linear(x, weight, bias)`` is a real ``nn.Linear``, so tensor-parallel plans accept it. A module called more than once per forward keeps
    one entry in the tree; its later calls run hidden copies that share its tensors (hooks
    fire on the first call only). Raises :class:`OutlineError` when the graph has no
    module structure to rebuild.
    """
    graph = copy.deepcopy(flat.graph)
    if not any(_stack(n) for n in graph.nodes):
        raise OutlineError("the graph records no nn_module_stack (was it traced by torch.export?)")
    _prepare(graph)
    root = KeepBuffersGraphModule(nn.Module(), fx.Graph(), class_name=type(flat).__name__)
    try:
        _ModuleFrame(graph, tuple(graph.nodes), {}, defaultdict(list), defaultdict(set), {}, None,
                     [("", None, 0)], "", {}, module=root).run_outer()
    except (RuntimeError, AssertionError) as err:
        raise OutlineError(f"could not rebuild the module tree: {err}") from err
    _adopt_orphans(root)
    for fqn, tensor, persistent in _owned_tensors(flat):
        _set_path(root, fqn, tensor, persistent)
    for fqn, sub in _graph_attrs(flat):  # the subgraphs of higher-order ops (no_grad regions, torch.cond)
        *parents, leaf = fqn.split(".")
        ensure_path(root, parents).add_module(leaf, sub)
    _containers(root)
    repeats: list[tuple[nn.Module, str, nn.Module]] = []
    for path, mod in list(root.named_modules()):
        if not isinstance(mod, InterpreterModule):
            continue
        base = _CALL_SUFFIX.sub("", path)
        for node in mod.graph.nodes:
            if node.op == "get_attr" and base:
                target = str(node.target)
                if not target.startswith(base + "."):
                    raise OutlineError(f"module {base} reads {target}, which it does not own")
                node.target = target[len(base) + 1:]
        mod._run_with_interpreter = False  # generated code, not fx.Interpreter: no per-node Python overhead
        if base != path:
            parent_path, _, name = path.rpartition(".")
            repeats.append((root.get_submodule(parent_path), name, root.get_submodule(base)))
    everything = list(root.modules())
    hidden: list[nn.Module] = []
    for parent, name, base_mod in repeats:  # later calls share the first call's tensors, off the tree
        siblings = parent._modules  # shared by every call of ``parent``
        mod = siblings.pop(name)
        hidden.append(mod)
        mod._parameters = base_mod._parameters
        mod._buffers = base_mod._buffers
        for holder in everything:
            if holder._modules is siblings:
                object.__setattr__(holder, name, mod)
    _real_linears(root)
    for mod in [*root.modules(), *hidden]:
        graph_of = mod.graph if isinstance(mod, InterpreterModule | fx.GraphModule) else None
        for node in graph_of.nodes if graph_of is not None else ():
            if node.name == "self" or keyword.iskeyword(node.name):  # a submodule called ``self`` (BERT's attention)
                node._rename(f"{node.name}_out")
        if isinstance(mod, InterpreterModule):
            if type(mod) is InterpreterModule:
                mod.__class__ = OutlinedModule  # the same module, that also pickles (torch.save of a stage)
            mod.finalize()
    root.__dict__["_pippy_hidden_calls"] = hidden  # off the tree: pippy.frontend.trainmode rewrites their graphs too
    for key, val in vars(flat).items():
        if key.startswith("_pippy"):  # pippy's own marks on the module (tensors still to materialize)
            setattr(root, key, val)
    try:
        root.graph.lint()
    except RuntimeError as err:
        raise OutlineError(f"the rebuilt graph does not check: {err}") from err
    root.recompile()
    return root

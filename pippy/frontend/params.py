"""Tied and shared parameters: give each read of a tied tensor the FQN of the module that reads it.

torch.export keeps one ``get_attr`` for a tensor registered under several names (GPT-2's
``transformer.wte.weight`` is ``lm_head.weight``). Each read is re-pointed at the alias owned by
the module doing the read, so every stage's ``state_dict`` uses the names the user expects
(``pippy.pipeline`` calls :func:`retarget_aliases` on the traced graph; its docstring has an example).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from pippy.frontend.compiled import uncompiled

if TYPE_CHECKING:  # pipe.py imports this module
    from pippy.frontend.pipe import SplitPipe

__all__ = ["alias_groups", "is_lifted_constant", "name_groups", "retarget_aliases", "tensor_at"]


def alias_groups(gm: torch.nn.Module) -> dict[int, list[str]]:
    """Names of every tensor registered under more than one FQN, keyed by ``id(tensor)``.

        >>> lin = torch.nn.Linear(2, 2); m = torch.nn.ModuleDict({"a": lin, "b": lin})
        >>> list(alias_groups(m).values())
        [['a.weight', 'b.weight'], ['a.bias', 'b.bias']]
    """
    names: dict[int, list[str]] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(name)
    return {k: v for k, v in names.items() if len(v) > 1}


def name_groups(pipe: SplitPipe | None, model: torch.nn.Module | None = None) -> list[list[str]]:
    """Groups of FQNs that denote one tensor: a pipe's shared (tied) tensors, plus ``model``'s aliases.

        >>> import pippy
        >>> lin = torch.nn.Linear(2, 2)
        >>> net = torch.nn.Sequential(lin, torch.nn.ReLU(), lin)  # one Linear under two names
        >>> pipe = pippy.pipeline(net, 1, (torch.randn(1, 2),), split_spec={"1": pippy.SplitPoint.END})
        >>> name_groups(pipe)  # stage 0 reads the weight as '0.weight', stage 1 as '2.weight'
        [['0.weight', '2.weight'], ['0.bias', '2.bias']]
        >>> name_groups(pipe, net)[2:]  # plus the model's own aliases
        [['0.weight', '2.weight'], ['0.bias', '2.bias']]
    """
    groups = [sorted({f for _, f in sp.uses}) for sp in pipe.shared] if pipe is not None else []
    for g in getattr(pipe, "aliases", []):  # tied in the model, also where a stage never reads one of the names
        if list(g) not in groups:
            groups.append(list(g))
    if model is not None:  # (a torch.compile'd model's names without its "_orig_mod.", as stages name them)
        groups += [sorted(v) for v in alias_groups(uncompiled(model)).values()]
    return groups


def is_lifted_constant(name: str) -> bool:
    """torch.export turns tensor constants into buffers named like ``lifted_tensor_0``; they are not model state.

        >>> is_lifted_constant("encoder._tensor_constant0"), is_lifted_constant("lin.weight")
        (True, False)
    """
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith(("lifted_tensor_", "_tensor_constant"))


def _owner_depth(alias: str, stack: list[str]) -> int:
    owner = alias.rsplit(".", 1)[0] if "." in alias else ""
    return len(owner) if owner in stack else -1


def retarget_aliases(gm: fx.GraphModule) -> None:
    """Point each reader of a tied tensor at the alias whose owning module encloses that reader.

        >>> from pippy.frontend.trace import export_module
        >>> class Tied(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        ...         self.b.weight = self.a.weight  # one tensor, two names
        ...     def forward(self, x):
        ...         return self.b(self.a(x))
        >>> gm = export_module(Tied(), (torch.randn(1, 2),)).module()
        >>> retarget_aliases(gm)
        >>> {v.name: str(v.args[1].target) for v in gm.graph.nodes if v.op == "call_function"}  # weight read
        {'linear': 'a.weight', 'linear_1': 'b.weight'}
    """
    groups = alias_groups(gm)
    if not groups:
        return
    resolved: dict[str, int] = {}
    for key, names in groups.items():
        for n in names:
            resolved[n] = key
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "get_attr" or str(node.target) not in resolved:
            continue
        aliases = groups[resolved[str(node.target)]]
        new_nodes: dict[str, fx.Node] = {str(node.target): node}
        for user in list(node.users):
            stack = [str(v[0]) for v in user.meta.get("nn_module_stack", {}).values()]
            best = max(aliases, key=lambda a: _owner_depth(a, stack))
            if _owner_depth(best, stack) < 0 or best == node.target:
                continue
            if best not in new_nodes:
                with graph.inserting_after(node):
                    new_nodes[best] = graph.get_attr(best)
                    new_nodes[best].meta = dict(node.meta)
            user.replace_input_with(node, new_nodes[best])
    graph.lint()
    gm.recompile()


def tensor_at(gm: torch.nn.Module, target: str) -> Any:
    """The attribute at dotted path ``target``.

        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3))
        >>> tensor_at(net, "0.weight") is net[0].weight, tensor_at(net, "0.bias").shape
        (True, torch.Size([3]))
    """
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

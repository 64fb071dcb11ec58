"""Recompute instead of send: values derived only from user inputs and constants (masks, positions).

Hugging Face models build attention masks and position ids from the input ids, and those
values are read by every block. Sending a ``[b, 1, s, s]`` mask to each later stage costs far
more than sending the ``[b, s]`` ids (or nothing, when the mask depends on shapes only) and
rebuilding it there. A value qualifies when it carries no gradient, every op above it is
deterministic and pure, and its inputs are user inputs, buffers or constants.

``split_graph`` asks :func:`remat_plan` for each value about to cross stages and, when
:func:`worth_recomputing` agrees, copies the plan's nodes into the consuming stage instead.

    >>> import torch
    >>> from pippy.frontend.split import infer_requires_grad
    >>> from pippy.frontend.trace import export_module
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb = torch.nn.Embedding(10, 4)
    ...     def forward(self, ids):
    ...         keep = (ids > 0).float()
    ...         mask = keep[:, None, :] * keep[:, :, None]  # [b, s, s], from the ids only
    ...         return self.emb(ids) * mask.sum(-1, keepdim=True)
    >>> gm = export_module(Net(), (torch.randint(0, 10, (2, 8)),)).module()
    >>> mask = next(v for v in gm.graph.nodes if v.name == "mul")
    >>> copy, leaves = remat_plan(mask, infer_requires_grad(gm))  # nodes to copy, user inputs they read
    >>> [v.op for v in leaves], worth_recomputing(mask, leaves, set())  # [2, 8] int64 ids < [2, 8, 8] float32
    (['placeholder'], True)
"""

from __future__ import annotations

from torch import fx

from pippy.frontend.costs import value_nbytes

__all__ = ["remat_plan", "worth_recomputing"]

_IMPURE = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "poisson", "exponential")
_MAX_NODES = 256


def _pure(node: fx.Node) -> bool:
    name = str(node.target)
    if any(k in name for k in _IMPURE):
        return False  # random
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return False  # writes into an input
    return not node.is_impure()


def remat_plan(node: fx.Node, rg: dict[fx.Node, bool]) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """The nodes to copy (in graph order) and the placeholders they read, or None if ``node`` can't be rebuilt."""
    if node.op != "call_function" or rg.get(node, False):
        return None
    todo, seen = [node], {node}
    copy_nodes: list[fx.Node] = []
    leaves: list[fx.Node] = []
    while todo:
        n = todo.pop()
        if n.op == "placeholder":
            leaves.append(n)
            continue
        if n.op == "get_attr":
            continue  # copied by the consumer like any buffer or constant
        if n.op != "call_function" or rg.get(n, False) or not _pure(n):
            return None
        copy_nodes.append(n)
        if len(copy_nodes) > _MAX_NODES:
            return None
        for x in n.all_input_nodes:
            if x not in seen:
                seen.add(x)
                todo.append(x)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(copy_nodes, key=order.__getitem__), sorted(leaves, key=order.__getitem__)


def worth_recomputing(node: fx.Node, leaves: list[fx.Node], already: set[fx.Node]) -> bool:
    """True when the user inputs still to send are fewer bytes than ``node`` itself."""
    extra = sum(value_nbytes(p) for p in leaves if p not in already)
    return extra < value_nbytes(node)

"""Embedding options that stages or micro-batches change: ``sparse=True`` weights read by several stages, and
``scale_grad_by_freq=True`` (token counts per micro-batch, not per batch).

    >>> import torch, warnings
    >>> from pippy import pipeline
    >>> emb = torch.nn.Embedding(10, 4, scale_grad_by_freq=True)
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     _ = pipeline(emb, 2, (torch.zeros(4, 3, dtype=torch.long),))
    >>> "scale_grad_by_freq" in str(seen[0].message)
    True
"""

from __future__ import annotations

import torch
from torch import fx

from pippy.frontend.notice import warn_user
from pippy.frontend.trace import PipeTraceError

__all__ = ["check_embeddings"]


# each lookup op: the argument index of its scale_grad_by_freq and of its sparse flag (the weight is argument 0)
_LOOKUPS = {
    torch.ops.aten.embedding.default: (3, 4),
    torch.ops.aten.embedding_bag.default: (3, 5),  # nn.EmbeddingBag
    torch.ops.aten.embedding_bag.padding_idx: (3, 5),
    torch.ops.aten._embedding_bag.default: (3, 5),
}


def _embeddings(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _LOOKUPS]


def _flag(node: fx.Node, which: int, name: str) -> bool:
    index = _LOOKUPS[node.target][which]  # type: ignore[index]
    return bool(node.args[index] if len(node.args) > index else node.kwargs.get(name, False))


def check_embeddings(gm: fx.GraphModule, assignment: dict[fx.Node, int], num_chunks: int) -> None:
    """Refuse a sparse-gradient embedding weight read by several stages; warn about ``scale_grad_by_freq``."""
    for node in _embeddings(gm):
        weight = node.args[0]
        if _flag(node, 1, "sparse") and isinstance(weight, fx.Node) and weight.op == "get_attr":
            stages = sorted({assignment[u] for u in weight.users if u in assignment})
            if len(stages) > 1:
                raise PipeTraceError(
                    f"the embedding weight {weight.target} has sparse gradients (nn.Embedding or nn.EmbeddingBag "
                    f"with sparse=True) and stages {stages} read it (a tied output layer, or a second lookup). The "
                    "copies' gradients are summed across stages, which needs dense gradients. How to fix: "
                    "sparse=False, or keep every use of the weight in one stage (move the split points)"
                )
    freq = sorted({str(n.args[0].target) for n in _embeddings(gm) if _flag(n, 0, "scale_grad_by_freq")
                   and isinstance(n.args[0], fx.Node)})
    if freq and num_chunks > 1:
        warn_user(
            f"pipeline(): the embedding {', '.join(freq)} has scale_grad_by_freq=True: each micro-batch's backward "
            "divides by the token counts of that micro-batch, not of the whole batch, so its gradient differs from "
            "one backward over the batch. For exact gradients pass scale_grad_by_freq=False, or run one micro-batch"
        )

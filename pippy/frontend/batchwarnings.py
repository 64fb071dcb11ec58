"""What splitting the batch into micro-batches changes in a model's results, warned about at ``pipeline()``.

Batch norm's per-micro-batch statistics, rows paired across the batch (in-batch negatives),
buffers written once per micro-batch, inputs split by default whose size is not the batch's, and
outputs whose reduction over the batch micro-batch values cannot rebuild: each warns once, naming
what to change. :func:`pippy.frontend.tracesplit.trace_and_split` calls them on the traced graph.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import fx

from pippy.frontend.mutation import written_after
from pippy.frontend.notice import warn_user
from pippy.frontend.trainmode import mode_args, node_owner

__all__ = [
    "warn_ambiguous",
    "warn_batch_statistics",
    "warn_buffer_updates",
    "warn_derived",
    "warn_mixed_rows",
    "warn_uneven",
    "warn_unknown",
    "written_buffers",
]


def warn_batch_statistics(gm: fx.GraphModule) -> None:
    """Warn when batch norm runs in train mode: each micro-batch is normalized by its own statistics.

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
        >>> gm = torch.export.export(net, (torch.randn(4, 3),)).module()
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warn_batch_statistics(gm)
        >>> str(seen[0].message)[:49]
        'pipeline(): batch norm in train mode (1) normaliz'
    """
    owners = sorted({node_owner(a.node) or "the model" for a in mode_args(gm.graph)
                     if "batch_norm" in str(a.node.target) and a.traced is True})
    if owners:
        warn_user(
            f"pipeline(): batch norm in train mode ({', '.join(owners[:3])}{', ...' if len(owners) > 3 else ''}) "
            "normalizes each micro-batch by its own mean and variance and updates its running statistics once per "
            "micro-batch, as under gradient accumulation (every pipeline library does so). Outputs and gradients "
            "therefore differ from one forward over the whole batch. For exact results use LayerNorm / GroupNorm, "
            "or keep those modules in eval mode",
        )


def warn_mixed_rows(sites: list[str]) -> None:
    """Warn where the model pairs the batch's rows with one another: each micro-batch sees only its own.

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warn_mixed_rows(["matmul at model.py:12"])
        >>> str(seen[0].message)[:74]
        "pipeline(): matmul at model.py:12: pairs the batch's rows with one another"
    """
    if sites:
        warn_user(
            f"pipeline(): {'; '.join(sites[:3])}{' ...' if len(sites) > 3 else ''}: pairs the batch's rows with one "
            "another (a result with two dims that grow with the batch, as in-batch negatives or a contrastive loss "
            "over u @ v.T). Schedules run each micro-batch alone (every pipeline library does), so it sees only its "
            "own micro-batch's rows: outputs, the loss and gradients differ from one forward over the whole batch. "
            "Return the per-row values (the embeddings) and pair them on the merged outputs, or accept pairs within "
            "each micro-batch",
        )


_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")  # batch norm's own warning covers these


def written_buffers(gm: fx.GraphModule) -> list[str]:
    """The buffers that the traced forward writes in place (``self.count.add_(1)``, ``self.ema.mul_(0.9)``).

        >>> import torch
        >>> class Counted(torch.nn.Linear):
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         self.calls.add_(1)
        ...         return super().forward(x)
        >>> net = Counted(3, 1); net.register_buffer("calls", torch.zeros(()))
        >>> written_buffers(torch.export.export(net, (torch.ones(2, 3),)).module())
        ['calls']
    """
    buffers = dict(gm.named_buffers())
    return [str(n.target) for n in gm.graph.nodes
            if n.op == "get_attr" and str(n.target) in buffers and written_after(n)]


def warn_buffer_updates(buffers: Iterable[str]) -> None:
    """Warn when forward writes buffers (a step counter, an EMA, a cache): each micro-batch's forward writes them.

    Batch norm's statistics are left to :func:`warn_batch_statistics`:

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warn_buffer_updates(["bn.running_mean", "step"])
        >>> str(seen[0].message)[:52]
        'pipeline(): forward updates the buffers step. Each m'
    """
    names = sorted({b for b in buffers if not b.endswith(_BN_STATS)})
    if names:
        warn_user(
            f"pipeline(): forward updates the buffers {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}. "
            "Each micro-batch's forward updates them in turn, as under gradient accumulation: a step counter "
            "advances num_chunks times per step and an average takes num_chunks updates, each from one micro-batch. "
            "If that is not what you want, update them outside forward (after the step)",
        )


def warn_uneven(said: str, n: int) -> None:
    """Warn about inputs split by default whose size differs from the batch's (see uneven_split_inputs).

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warn_uneven("x has 8 rows, mask 4", 2)
        ...     warn_uneven("", 2)  # nothing uneven: no warning
        >>> len(seen), "Replicate()" in str(seen[0].message)
        (1, True)
    """
    if said:
        warn_user(
            f"pipeline(): the inputs split into micro-batches differ in size: {said}. Each micro-batch gets 1/{n} of "
            "each. If such an input is not batched (positions, a mask or table shared by every row), it is cut into "
            "pieces and broadcasting may hide it: give it Replicate() (pipeline(..., args_chunk_spec=(TensorChunkSpec"
            "(0), Replicate())) or kwargs_chunk_spec={name: Replicate(), ...}, one entry per keyword argument). If it "
            "is batched along another dim (an RNN's h0 of shape [layers, batch, hidden]: TensorChunkSpec(1)) or at "
            "another rate, pass its TensorChunkSpec explicitly and this warning goes",
        )


def warn_unknown(reductions: list[str | None], shapes: list[tuple[Any, ...] | None]) -> None:
    """Warn about outputs whose batch is gone by ops that micro-batch values cannot rebuild (see output_reductions).

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warn_unknown(["mean", "unknown"], [(), (3,)])
        >>> str(seen[0].message)[:42]
        'pipeline(): outputs 1 (shape [3]) combine '
    """
    unknown = [j for j, r in enumerate(reductions) if r == "unknown"]
    if not unknown:
        return
    said = ", ".join(f"{j} (shape {list(shapes[j] or ())})" for j in unknown)
    warn_user(
        f"pipeline(): outputs {said} combine the batch's rows by ops pippy cannot rebuild from micro-batches (max, "
        "var, norm, a product of means, ...). Schedules run each micro-batch alone, so these come back as the mean "
        "of the micro-batches' values (0-dim) or their concatenation, not the model's value; used as a loss, the "
        "gradients differ too. Compute such values from the merged outputs after the step (return the per-row "
        "values instead), or pass output_merge_spec= to the schedule if the micro-batch values are what you want",
    )


def warn_derived(reductions: list[str | None], values: list[Any]) -> None:
    """Warn about plain numbers the trace computed from the batch size in a way micro-batches cannot add up.

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warn_derived([None, "derived"], [None, 5])
        >>> str(seen[0].message)[:46]
        'pipeline(): outputs 1 (5 on one micro-batch) a'
    """
    def shown(v: Any) -> str:
        return repr(v[0] if len(v) == 1 else list(v)) if isinstance(v, tuple) else repr(v)

    said = [f"{j} ({shown(values[j])} on one micro-batch)" for j, r in enumerate(reductions) if r == "derived"]
    if said:
        warn_user(
            f"pipeline(): outputs {', '.join(said)} are numbers the trace computed from the batch size (they change "
            "when the batch does, and do not add up over micro-batches, as x.shape[0] or 3 * x.shape[0] would). "
            "Each micro-batch computes its own from its own rows, so the pipeline returns one micro-batch's value, "
            "not the whole batch's. How to fix: compute such numbers from the batch outside the model, or return "
            "the row count itself (x.shape[0], which pippy adds up) and derive the number from it",
        )


def warn_ambiguous(reductions: list[str | None]) -> None:
    """Warn about scalars divided by an int on one-row micro-batches that the trace on two rows could not settle.

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warn_ambiguous(["ambiguous", "sum"])
        >>> str(seen[0].message)[:51]
        'pipeline(): outputs [0] divide a sum by an int, tra'
    """
    said = [j for j, r in enumerate(reductions) if r == "ambiguous"]
    if said:
        warn_user(
            f"pipeline(): outputs {said} divide a sum by an int, traced on micro-batches of one row, where a count of "
            "rows (x.shape[0], len(x)) is 1 and looks like a literal; tracing the model on two rows to tell failed. "
            "Expected a mean (sum / x.shape[0]) or a sum (sum / a constant); pippy cannot tell which, so micro-batch "
            "values are averaged. How to fix: pass loss_reduction='mean' or 'sum' to the schedule for the model's "
            "own loss (output_merge_spec= for other outputs), or trace with micro-batches of two rows or more",
        )

"""What differs between a step's input and the traced example, and the fix that fits that difference.

A static pipe runs the shapes and dtypes it was traced for. An input that differs gets advice for
what actually differs: the batch dim (batch size, or a micro-batch count other than ``num_chunks``),
another dim (a feature or sequence size), the number of dims, or the dtype.

    >>> import torch
    >>> print(input_mismatch("input leaf 0 (args[0])", torch.ones(2, 9), torch.ones(2, 8)))
    shape mismatch at input leaf 0 (args[0]): a micro-batch has shape (2, 9) torch.float32, but the pipeline was traced for (2, 8) \
torch.float32 (full batch / num_chunks). Dim 1 is 9, traced as 8: not the batch dim, so this is a feature or \
sequence size of the input, and a static pipe runs the traced one. Pass inputs of the traced size (check the \
data pipeline), or trace again with an example of this size (dynamic_shapes={'<input>': {1: (lo, hi)}} if it varies).
"""

from __future__ import annotations

import torch

__all__ = ["dtype_advice", "handcut_mismatch", "input_mismatch", "mismatch_kind"]


def mismatch_kind(got: torch.Tensor, ex: torch.Tensor) -> str:
    """What differs between ``got`` and ``ex``, in the words PyTorch pipelining's shape errors use.

        >>> mismatch_kind(torch.ones(2, dtype=torch.int32), torch.ones(2, dtype=torch.int64))
        'dtype mismatch'
        >>> mismatch_kind(torch.ones(3), torch.ones(2, dtype=torch.int64))
        'shape mismatch and dtype mismatch'
    """
    kinds = [k for k, differs in (("shape", tuple(got.shape) != tuple(ex.shape)), ("dtype", got.dtype != ex.dtype))
             if differs]
    return " and ".join(f"{k} mismatch" for k in kinds) or "no mismatch"


def _cast(dtype: torch.dtype) -> str:
    """The tensor method that casts to ``dtype``: ``x.float()``, ``x.long()``, else ``x.to(dtype)``."""
    return {torch.float32: "x.float()", torch.float64: "x.double()", torch.int64: "x.long()", torch.int32: "x.int()",
            torch.bfloat16: "x.bfloat16()", torch.float16: "x.half()", torch.bool: "x.bool()"}.get(dtype, f"x.to({dtype})")


def dtype_advice(got: torch.dtype, traced: torch.dtype) -> str:
    """How to fix an input of dtype ``got`` where ``traced`` was traced.

        >>> dtype_advice(torch.int64, torch.float32)
        'cast it to torch.float32 (x.float()), or trace again with an example of torch.int64'
    """
    return f"cast it to {traced} ({_cast(traced)}), or trace again with an example of {got}"


def handcut_mismatch(name: str, got: torch.Tensor, ex: torch.Tensor, learned: bool) -> str:
    """The message for micro-batch input ``got`` unlike ``ex``, the input of hand-cut stages.

    ``learned``: the stages learned ``ex`` at their first step (built without ``input_args``);
    else ``input_args`` gave it. Only what differs is named: a dtype alone gets a cast, not sizes.

        >>> print(handcut_mismatch("input leaf 0 (args[0])", torch.ones(2, 3, dtype=torch.int32),
        ...                        torch.ones(2, 3, dtype=torch.int64), learned=True))
        dtype mismatch at input leaf 0 (args[0]): a micro-batch is torch.int32, but these hand-cut stages learned \
torch.int64 at their first step (built without input_args); the stages send and receive that dtype. Cast it to \
torch.int64 (x.long()), or build new stages (and a new schedule) for torch.int32
    """
    where = ("these hand-cut stages learned {} at their first step (built without input_args)" if learned else
             "ManualPipelineStage's input_args gave {}")
    head = f"{mismatch_kind(got, ex)} at {name}: a micro-batch"
    if tuple(got.shape) == tuple(ex.shape):
        return (f"{head} is {got.dtype}, but {where.format(ex.dtype)}; the stages send and receive that dtype. Cast it to "
                f"{ex.dtype} ({_cast(ex.dtype)}), or build new stages (and a new schedule) for {got.dtype}")
    dtype = (f" (its dtype too: cast it to {ex.dtype} with {_cast(ex.dtype)})" if got.dtype != ex.dtype else "")
    if learned:
        return (f"{head} has shape {tuple(got.shape)} {got.dtype}, but {where.format(f'{tuple(ex.shape)} {ex.dtype}')}, "
                "and their messages stay that size. Keep the batch size and micro-batch count of that step"
                f"{dtype}, or build new stages (and a new schedule) for the new size")
    return (f"{head} has shape {tuple(got.shape)} {got.dtype}, but {where.format(f'{tuple(ex.shape)} {ex.dtype}')}. "
            "input_args is one micro-batch (batch / n_microbatches rows, e.g. x[:len(x) // n]), not the whole batch: "
            f"pass one micro-batch there, or a batch of n_microbatches micro-batches of that shape{dtype}")


def input_mismatch(name: str, got: torch.Tensor, ex: torch.Tensor, batch_dim: int = 0,
                   n_microbatches: int | None = None, num_chunks: int | None = None) -> str:
    """The message for micro-batch input ``got`` that differs from the traced ``ex`` in shape and/or dtype.

        >>> print(input_mismatch("input leaf 0 (args[0])", torch.ones(2, 3, dtype=torch.int32),
        ...                      torch.ones(2, 3, dtype=torch.int64)))
        dtype mismatch at input leaf 0 (args[0]): a micro-batch is torch.int32 (shape (2, 3) as traced), but the pipeline was traced for torch.int64: cast it to torch.int64 (x.long()), or trace again with an example of torch.int32.

    ``batch_dim`` is the dim the batch is split along; ``n_microbatches`` (the schedule's) and
    ``num_chunks`` (the pipe's), when both are known and differ, explain a micro-batch of another size.
    """
    gs, es = tuple(got.shape), tuple(ex.shape)
    if gs == es:  # the dtype alone: nothing about sizes
        return (f"dtype mismatch at {name}: a micro-batch is {got.dtype} (shape {gs} as traced), but the pipeline was "
                f"traced for {ex.dtype}: {dtype_advice(got.dtype, ex.dtype)}.")
    head = (f"{mismatch_kind(got, ex)} at {name}: a micro-batch has shape {gs} {got.dtype}, but the pipeline was traced for {es} {ex.dtype} "
            "(full batch / num_chunks).")
    fixes = []
    if got.dtype != ex.dtype:
        fixes.append(f"Its dtype is {got.dtype}, traced as {ex.dtype}: {dtype_advice(got.dtype, ex.dtype)}.")
    if len(gs) != len(es):
        fixes.append(f"It has {len(gs)} dims, traced with {len(es)}: pass the layout of the example (a missing or "
                     "extra batch, channel or sequence dim?), or trace again with an example of this layout.")
    elif gs != es:
        other = [d for d in range(len(gs)) if gs[d] != es[d] and d != batch_dim]
        if other:
            d = other[0]
            fixes.append(f"Dim {d} is {gs[d]}, traced as {es[d]}: not the batch dim, so this is a feature or sequence "
                         "size of the input, and a static pipe runs the traced one. Pass inputs of the traced size "
                         "(check the data pipeline), or trace again with an example of this size "
                         f"(dynamic_shapes={{'<input>': {{{d}: (lo, hi)}}}} if it varies).")
        if gs[batch_dim] != es[batch_dim]:
            fixes.append(_batch_advice(gs[batch_dim], es[batch_dim], batch_dim, n_microbatches, num_chunks))
    return " ".join([head, *fixes])


def _batch_advice(rows: int, traced: int, dim: int, n: int | None, chunks: int | None) -> str:
    """Advice for a micro-batch of ``rows`` along the batch dim ``dim`` where ``traced`` rows were traced.

        >>> print(_batch_advice(4, 2, 0, 2, 4))
        The schedule splits the batch into n_microbatches=2, but the pipe was traced with num_chunks=4 (2 rows \
per micro-batch along dim 0); this batch of 8 gives 4. Build the schedule with n_microbatches=4, or keep 2 \
micro-batches and pass a batch of 4 (any count works while each micro-batch has the traced 2 rows), or trace \
with pipeline(..., dynamic_shapes='auto') so that sizes may vary.
    """
    if n is not None and chunks is not None and n != chunks:
        return (f"The schedule splits the batch into n_microbatches={n}, but the pipe was traced with "
                f"num_chunks={chunks} ({traced} rows per micro-batch along dim {dim}); this batch of {rows * n} gives "
                f"{rows}. Build the schedule with n_microbatches={chunks}, or keep {n} micro-batches and pass a batch "
                f"of {traced * n} (any count works while each micro-batch has the traced {traced} rows), or trace "
                "with pipeline(..., dynamic_shapes='auto') so that sizes may vary.")
    full = f" (a batch of {rows * n}, traced with {traced * n})" if n is not None else ""
    return (f"The batch dim {dim} differs{full}: shapes are static, so use the traced batch size, or trace with "
            f"pipeline(..., dynamic_shapes='auto' or {{'<input>': {{{dim}: (lo, hi)}}}}) so that sizes may vary. An input "
            "that is not batched needs Replicate() in args_chunk_spec/kwargs_chunk_spec.")

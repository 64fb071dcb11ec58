"""PiPPy's schedule entry points over pre-split micro-batches: ``_step_microbatches`` and ``_check_inputs``.

PiPPy's tests and some scripts drive a schedule with lists of micro-batches instead of one
batch. Here they are checked the way PiPPy checked them, joined into the batch they were cut
from, and run by the ordinary ``step()``.

    >>> import torch
    >>> from pippy import Schedule1F1B, pipeline
    >>> from pippy.runtime.localcomm import LocalTransport
    >>> pipe = pipeline(torch.nn.Linear(2, 2), 2, (torch.ones(4, 2),))
    >>> sched = Schedule1F1B(pipe.build_stage(0, "cpu"), 2, transport=LocalTransport.world(1)[0])
    >>> sched._step_microbatches([torch.ones(2, 2), torch.ones(2, 2)]).shape
    torch.Size([4, 2])
    >>> sched._step_microbatches([torch.ones(2, 2)])
    Traceback (most recent call last):
    ...
    ValueError: Schedule1F1B: expected 2 micro-batches of positional inputs (n_microbatches), got 1; ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pippy.microbatch import merge_chunks

__all__ = ["MicrobatchSteps"]


class MicrobatchSteps:
    """Mixin for schedule classes: PiPPy's micro-batch-list API on top of ``step()``."""

    n_microbatches: int

    def _check_inputs(
        self,
        arg_mbs: Sequence[Any] | None = None,
        kwarg_mbs: Sequence[dict[str, Any]] | None = None,
        target_mbs: Sequence[Any] | None = None,
        losses: list[Any] | None = None,
    ) -> tuple[list[Any], list[dict[str, Any]]]:
        """Check micro-batch lists as PiPPy did: lists (TypeError) of n_microbatches entries (ValueError)."""
        name = type(self).__name__
        m = self.n_microbatches

        def check(value: Any, what: str) -> list[Any] | None:
            if value is None:
                return None
            if not isinstance(value, list | tuple):
                raise TypeError(
                    f"{name}: {what} must be a list with one entry per micro-batch, got {type(value).__name__}; "
                    f"pass [mb_0, ..., mb_{m - 1}] (or call step() with the whole batch)"
                )
            if len(value) != m:
                raise ValueError(
                    f"{name}: expected {m} micro-batches of {what} (n_microbatches), got {len(value)}; pass one "
                    f"entry per micro-batch, or build the schedule with n_microbatches={len(value)}"
                )
            return list(value)

        args = check(arg_mbs, "positional inputs")
        kwargs = check(kwarg_mbs, "keyword inputs")
        check(target_mbs, "targets")
        if losses is not None and not isinstance(losses, list):
            raise TypeError(f"{name}: losses must be a list to append to, got {type(losses).__name__}")
        return (args if args is not None else [()] * m), (kwargs if kwargs is not None else [{}] * m)

    def _step_microbatches(
        self,
        arg_mbs: Sequence[Any] | None = None,
        kwarg_mbs: Sequence[dict[str, Any]] | None = None,
        target_mbs: Sequence[Any] | None = None,
        losses: list[Any] | None = None,
    ) -> Any:
        """One step over ready-made micro-batches (PiPPy's private entry point); returns what ``step()`` returns."""
        arg_list, kwarg_list = self._check_inputs(arg_mbs, kwarg_mbs, target_mbs, losses)
        per_mb = [tuple(a) if isinstance(a, list | tuple) else (a,) for a in arg_list]
        pipe = getattr(self, "pipe", None)
        args = merge_chunks(per_mb, getattr(pipe, "args_chunk_spec", None)) if any(per_mb) else ()
        kwargs = merge_chunks(kwarg_list, getattr(pipe, "kwargs_chunk_spec", None)) if any(kwarg_list) else {}
        target = merge_chunks(list(target_mbs), getattr(self, "target_chunk_spec", None)) if target_mbs else None
        return self.step(*args, target=target, losses=losses, **kwargs)  # type: ignore[attr-defined]

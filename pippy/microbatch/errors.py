"""The errors of a stage used wrongly and of shapes that do not meet, shared by every layer that raises them.

They live in the lowest layer because the batch split (here), the input checks (frontend) and the
runtime all raise them; ``pippy.runtime.stage`` and the package (``from pippy import
PipeliningShapeError``) are where users import them from.

    >>> issubclass(PipeliningShapeError, StageError), issubclass(PipeliningShapeError, ValueError)
    (True, True)
"""

from __future__ import annotations

__all__ = ["PipeliningShapeError", "StageError", "value_error_like"]


class StageError(RuntimeError):
    """A stage was used wrongly; the message names stage, rank, micro-batch and action.

        >>> str(StageError("rank 0, stage 1: no target"))
        'rank 0, stage 1: no target'
    """


class PipeliningShapeError(StageError, ValueError):
    """A tensor's shape or dtype differs from the one a stage expects (PyTorch pipelining's name).

    Raised for a step's input unlike the traced (or hand-cut stage's) input, a batch that does not
    split into equal micro-batches, a received or announced shape unlike the pipe's, and a stage
    output unlike the traced one. It is a ``StageError`` and a ``ValueError``, the two classes pippy
    raised for these before, so ``except`` clauses written for either still catch it.

        >>> try:
        ...     raise PipeliningShapeError("input leaf 0: dtype mismatch: torch.int32, expected torch.int64")
        ... except ValueError as e:
        ...     print(type(e).__name__)
        PipeliningShapeError
    """


def value_error_like(exc: ValueError) -> type[ValueError]:
    """The class to raise ``exc`` again as, with more context: a shape error stays one, any other is a ValueError.

        >>> value_error_like(PipeliningShapeError("x")).__name__, value_error_like(ValueError("x")).__name__
        ('PipeliningShapeError', 'ValueError')
    """
    return PipeliningShapeError if isinstance(exc, PipeliningShapeError) else ValueError


# where users import them from, and how tracebacks (and pickles across processes) name them
StageError.__module__ = "pippy.runtime.stage"
PipeliningShapeError.__module__ = "pippy.runtime.stage"

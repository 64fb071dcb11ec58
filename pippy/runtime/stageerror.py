"""The error of a stage used wrongly, raised by the stage and everything that drives it (defined in the lowest layer).

    >>> issubclass(PipeliningShapeError, StageError), issubclass(StageCountError, ValueError)
    (True, True)
"""

from __future__ import annotations

from pippy.microbatch.errors import PipeliningShapeError, StageError

__all__ = ["PipeliningShapeError", "StageCountError", "StageError"]


class StageCountError(StageError, ValueError):
    """A schedule was given a pipe of another stage count than it runs (e.g. ZB-V, two stages per rank, given one).

    A ``ValueError``, as PyTorch pipelining raises there, and a ``StageError``, as pippy raised before.

        >>> issubclass(StageCountError, ValueError), issubclass(StageCountError, StageError)
        (True, True)
    """


StageCountError.__module__ = "pippy.runtime.stage"  # where the stage errors are imported from

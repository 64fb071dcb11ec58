"""The error of a stage used wrongly, raised by the stage and everything that drives it."""

from __future__ import annotations

__all__ = ["StageError"]


class StageError(RuntimeError):
    """A stage was used wrongly; the message names stage, rank, micro-batch and action."""


# where users import it from, and how tracebacks name it: defined here only so that the stage's own
# modules (pippy.runtime.stagebackward) can raise it without importing the stage
StageError.__module__ = "pippy.runtime.stage"

"""Argument checks shared by the schedule generators (clear ValueErrors: given, required, fix)."""

from __future__ import annotations

__all__ = ["bad_args", "check_pm", "check_v"]


def bad_args(schedule: str, given: str, required: str, fix: str) -> ValueError:
    """Build the generators' standard error: what was given, what is required, how to fix it.

        >>> str(bad_args("gpipe", "p=0", "p >= 1", "pass at least one rank"))
        'gpipe: got p=0, but it requires p >= 1. Fix: pass at least one rank.'
    """
    return ValueError(f"{schedule}: got {given}, but it requires {required}. Fix: {fix}.")


def check_pm(schedule: str, p: int, m: int) -> None:
    """Raise unless ``p >= 1`` ranks and ``m >= 1`` micro-batches (both ints).

        >>> check_pm("gpipe", 2, 4)
        >>> check_pm("gpipe", 2, 0)
        Traceback (most recent call last):
        ...
        ValueError: gpipe: got m=0, but it requires m >= 1 (the number of micro-batches). Fix: pass a positive int for m.
    """
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise bad_args(schedule, f"p={p!r}", "p >= 1 (the number of pipeline ranks)", "pass a positive int for p")
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise bad_args(
            schedule, f"m={m!r}", "m >= 1 (the number of micro-batches)", "pass a positive int for m"
        )


def check_v(schedule: str, v: int) -> None:
    """Raise unless ``v >= 1`` stages per rank.

        >>> check_v("looped_bfs", 2)
        >>> check_v("looped_bfs", 0)
        Traceback (most recent call last):
        ...
        ValueError: looped_bfs: got v=0, but it requires v >= 1 (stages per rank). Fix: pass a positive int for v, e.g. v=2.
    """
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise bad_args(schedule, f"v={v!r}", "v >= 1 (stages per rank)", "pass a positive int for v, e.g. v=2")

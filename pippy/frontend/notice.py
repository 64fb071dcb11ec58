"""Warnings that point at the user's line: the first caller outside the pippy package.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     warn_user("ran forward only")
    >>> str(seen[0].message), seen[0].filename.endswith("notice.py")
    ('ran forward only', False)
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["called_by_user", "warn_user"]

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message)`` attributed to the nearest frame outside pippy (the user's call)."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the caller of warn_user
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PKG + os.sep):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)


def called_by_user() -> bool:
    """Whether the function calling this one was called from outside the pippy package (the user's code)."""
    frame = sys._getframe(2)
    return not os.path.abspath(frame.f_code.co_filename).startswith(_PKG + os.sep)


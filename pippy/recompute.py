"""Activation recompute per stage (the public face of :mod:`pippy.runtime.recompute`).

    >>> from pippy.recompute import enable_recompute, disable_recompute
"""

from pippy.runtime.recompute import disable_recompute, enable_recompute, is_recomputing

__all__ = ["disable_recompute", "enable_recompute", "is_recomputing"]

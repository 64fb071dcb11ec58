"""Activation recompute per stage (the public face of :mod:`pippy.runtime.recompute`).

    >>> import torch
    >>> from pippy.recompute import enable_recompute, disable_recompute, is_recomputing
    >>> lin = torch.nn.Linear(2, 2); _ = enable_recompute(lin); is_recomputing(lin)
    True
"""

from pippy.runtime.recompute import disable_recompute, enable_recompute, is_recomputing

__all__ = ["disable_recompute", "enable_recompute", "is_recomputing"]

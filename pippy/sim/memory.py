"""Activation bytes: count what autograd saves for backward, the memory a pipeline schedule keeps alive.

The runtime counts it per micro-batch (``stage.measure_activations``) and the profiler per stage
(``act_bytes`` of the cost model), with this one counter, so measurement and prediction agree.

    >>> import torch
    >>> lin = torch.nn.Linear(4, 4)
    >>> with SavedBytes(skip=lin.parameters()) as counter:
    ...     y = torch.tanh(lin(torch.ones(2, 4)))
    >>> counter.total  # tanh saves its output (2 x 4 floats); the input of linear is saved too
    64
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["SavedBytes", "held_bytes"]


class SavedBytes:
    """A ``with`` block that counts the bytes autograd saves: each storage once, ``skip`` excluded.

    Pass the parameters as ``skip``: they are static memory, not activations. Autograd gets a
    detached alias of each saved tensor: the same storage, so the count stays true while the
    graph lives, and no grad_fn, because returning the tensor itself would tie a saved output
    and its own graph node into a reference cycle (through C++, invisible to Python's GC) that
    only a backward breaks; a forward dropped without one would then leak its activations.

        >>> w = torch.ones(3, requires_grad=True)
        >>> with SavedBytes(skip=[w]) as c:
        ...     _ = (w * torch.ones(3)).exp()
        >>> c.total  # mul saves the ones (w is skipped), exp saves its output: 2 x 3 floats
        24
    """

    def __init__(self, skip: Iterable[torch.Tensor] = ()) -> None:
        self._seen = {_storage_key(t) for t in skip}
        self.total = 0
        self._hooks: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self._seen:
            self._seen.add(key)
            self.total += _storage_nbytes(t)
        return t.detach()

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None


def held_bytes(tensors: Iterable[Any], skip: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages behind ``tensors`` (non-tensors ignored), ``skip``'s excluded.

    What a stage holds between a micro-batch's ``I`` and ``W`` is counted this way, so the
    runtime and the profiler agree on it as they do on :class:`SavedBytes`.

        >>> x = torch.ones(2, 4)
        >>> held_bytes([x, x[0], None, torch.ones(3)])  # x and its view share one storage
        44
    """
    seen = {_storage_key(t) for t in skip}
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and (key := _storage_key(t)) not in seen:
            seen.add(key)
            total += _storage_nbytes(t)
    return total


def _storage_key(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage (e.g. some subclasses)
        return id(t)


def _storage_nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return int(t.numel() * t.element_size())

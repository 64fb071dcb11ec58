"""This process's CUDA device: a bare ``"cuda"`` resolved, the current device set, the device NCCL collectives use.

torch's object collectives (``gather_object``, ``all_gather_object``, ``broadcast_object_list``) and
``barrier`` on an NCCL group run on ``torch.cuda.current_device()``; a process that never called
``torch.cuda.set_device`` is on ``cuda:0`` like every other rank of its host (NCCL then reports a
duplicate GPU, or hangs). pippy's own collectives go through :func:`barrier` and
:func:`on_collective_device`, which pick this process's device (see :func:`local_cuda_index`).

    >>> barrier()  # no process group: nothing to wait for
    >>> with on_collective_device():
    ...     pass
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["barrier", "collective_device", "local_cuda_index", "on_collective_device", "resolve_cuda"]


def local_cuda_index() -> int:
    """This process's CUDA device index: the current device, or ``LOCAL_RANK`` (torchrun) while that is still 0.

        >>> import unittest.mock as m
        >>> with m.patch("torch.cuda.current_device", lambda: 0), m.patch("torch.cuda.device_count", lambda: 4), \\
        ...         m.patch.dict(os.environ, {"LOCAL_RANK": "3"}):
        ...     local_cuda_index()
        3
    """
    current = int(torch.cuda.current_device())
    local = os.environ.get("LOCAL_RANK", "")
    if current == 0 and local.isdigit() and int(local) < torch.cuda.device_count():
        return int(local)
    return current


def resolve_cuda(device: torch.device | str) -> torch.device:
    """``device`` with a bare ``cuda`` given this process's index (:func:`local_cuda_index`); others unchanged.

        >>> resolve_cuda("cpu")
        device(type='cpu')
    """
    dev = torch.device(device)
    return torch.device("cuda", local_cuda_index()) if dev.type == "cuda" and dev.index is None else dev


def collective_device(group: Any = None) -> torch.device | None:
    """The CUDA device object collectives and barriers of ``group`` run on: this process's under NCCL, else None.

    A group of several backends (``"cpu:gloo,cuda:nccl"``) gathers objects on the CPU, as torch does.

        >>> print(collective_device())  # no process group
        None
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if str(dist.get_backend(group)).lower() != "nccl" or not torch.cuda.is_available():
        return None
    return torch.device("cuda", local_cuda_index())


@contextlib.contextmanager
def on_collective_device(group: Any = None) -> Iterator[None]:
    """Within the block the current CUDA device is ``group``'s :func:`collective_device` (if any)."""
    dev = collective_device(group)
    if dev is None:
        yield
        return
    with torch.cuda.device(dev):
        yield


def barrier(group: Any = None) -> None:
    """``dist.barrier(group)`` on this process's device under NCCL (``device_ids=``); nothing without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dev = collective_device(group)
    if dev is None:
        dist.barrier(group=group)
    else:
        dist.barrier(group=group, device_ids=[int(dev.index or 0)])

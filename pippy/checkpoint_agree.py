"""DCP loads end together: every rank posts its outcome through the store, so one rank's failure raises on every rank.

A ``format="dcp"`` load reads on each rank alone. A rank whose stages want an FQN the checkpoint
lacks would raise there while the other ranks went on, only to wait in their next collective for
the process group's whole timeout. So after its load each rank posts its outcome (fine, or its
error) in the process group's store under the load's number, and waits, bounded by pippy's timeout
(``PIPPY_TIMEOUT``, else 300 s), for every other rank's; then every rank raises the same error,
naming each rank that failed and what it said. Like a DCP save, a DCP load is called by every rank
of the job, as often on each (a rank holding no stage passes ``[]``).

    >>> settle("ckpt", None)  # one process: nothing to wait for
    >>> settle("ckpt", KeyError("no tensor for stage 1 ['extra']"))
    Traceback (most recent call last):
    KeyError: "no tensor for stage 1 ['extra']"
"""

from __future__ import annotations

import builtins
import itertools
import json
import os
from typing import Any

import torch.distributed as dist

from pippy.frontend.cudadevice import on_collective_device
from pippy.runtime.comm import PipeTimeoutError
from pippy.runtime.storesync import poll_keys
from pippy.runtime.transport import default_timeout
from pippy.runtime.watch import group_store

__all__ = ["CheckpointKeyError", "CheckpointLoadError", "settle"]

_LOADS = itertools.count()  # this process's DCP loads: the n-th of every rank meet under one key


class CheckpointLoadError(RuntimeError):
    """A checkpoint load failed on another rank (its error was not one of Python's own, which are raised as such)."""


class CheckpointKeyError(KeyError):
    """A ``KeyError`` (an FQN the checkpoint lacks, on some rank) whose message prints as written, not quoted.

        >>> print(CheckpointKeyError("rank 1 lacks extra"), KeyError("rank 1 lacks extra"))
        rank 1 lacks extra 'rank 1 lacks extra'
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _text(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]  # str(KeyError) would quote it
    return str(err)


def _error_type(name: str) -> type[Exception]:
    if name in ("KeyError", "CheckpointKeyError"):
        return CheckpointKeyError
    found = getattr(builtins, name, None)
    if isinstance(found, type) and issubclass(found, Exception):
        return found
    return CheckpointLoadError


def _exchange(mine: Any, rank: int, world: int, what: str) -> list[Any]:
    """Every rank's ``mine`` (JSON-able), in rank order, through the store; bounded by pippy's timeout."""
    store = group_store(dist.group.WORLD)
    if store is None:  # torch does not say which store: the group's own collective (bounded by its timeout)
        everyone: list[Any] = [None] * world
        with on_collective_device():  # NCCL gathers objects on the current CUDA device
            dist.all_gather_object(everyone, mine)
        return everyone
    n = next(_LOADS)
    prefix = "pippy/checkpoint_load/"
    store.set(f"{prefix}{n}/{rank}", json.dumps(mine))
    if n >= 2:  # every rank posted load n - 1, so all have read load n - 2's outcomes
        try:
            store.delete_key(f"{prefix}{n - 2}/{rank}")
        except Exception:  # a store without deletes: the keys are small
            pass
    timeout = default_timeout()
    keys = {r: f"{prefix}{n}/{r}" for r in range(world) if r != rank}
    missing, _ = poll_keys(store, keys, timeout, lambda: None)
    if missing:
        raise PipeTimeoutError(
            f"rank {rank}: {what} (DCP load number {n} of this rank) waited {timeout:g}s for the outcome of the load "
            f"on ranks {missing}, which never came. Expected every rank to call checkpoint.load(..., format='dcp') "
            "as often as the others (a rank holding no stage passes []); a rank may have failed before it (see its "
            "own error). Raise the limit with PIPPY_TIMEOUT if a rank is just slow"
        )
    return [mine if r == rank else json.loads(store.get(keys[r]).decode()) for r in range(world)]


def settle(path: str | os.PathLike[str], err: Exception | None) -> None:
    """End a DCP load of checkpoint ``path`` on every rank: raise on all if it failed on any (``err``: this rank's).

    With one process ``err`` is raised as it is (see the module's example). With several, the
    error names every failed rank with its message; a rank's own error type is kept when it is one
    of Python's (``FileNotFoundError``, ``ValueError``, ...; a ``KeyError`` as :class:`CheckpointKeyError`),
    else :class:`CheckpointLoadError`.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if err is not None:
            raise err
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    what = f"checkpoint.load({os.fspath(path)!r})"
    mine = None if err is None else [type(err).__name__, _text(err)]
    try:
        everyone = _exchange(mine, rank, world, what)
    except PipeTimeoutError as timeout:
        if err is not None:
            raise PipeTimeoutError(f"{timeout}. This rank's own load failed: {_text(err)}") from err
        raise
    failed = {r: o for r, o in enumerate(everyone) if o is not None}
    if not failed:
        return
    first = min(failed)
    lines = "\n".join(f"  rank {r}: {name}: {text}" for r, (name, text) in sorted(failed.items()))
    status = "this rank's own load failed" if rank in failed else "this rank's own load went well"
    message = (f"rank {rank}: {what} failed on rank{'s' if len(failed) > 1 else ''} {sorted(failed)}, so every rank "
               f"stops here ({status}):\n{lines}")
    raise _error_type(failed[first][0])(message) from err

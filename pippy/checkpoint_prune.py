"""Stale DCP sub-directories: once a save is complete, those of pippy's that no stage record names are removed.

A ``format="dcp"`` save writes a sub-directory per save call, named after the call's stages
(:mod:`pippy.checkpoint_dcp`), so a save with another grouping (every stage at once, then one call
per stage, or another split) leaves older ones behind that no load or merge reads again.
:func:`prune_stale` removes a sub-directory only when all of these hold:

* pippy wrote it: it holds pippy's mark (:data:`MARK`, written by :func:`mark` once its DCP save
  is done, and taken away by :func:`unmark` before a save writes into it again, so a directory
  being written is never pruned);
* the checkpoint's records are one complete save (``stage_0.json`` .. ``stage_<n-1>.json`` of
  one split), and none of them names it: a save still under way (the next per-stage call) prunes nothing.

Ranks of one process group prune once every rank has written its records: one rank prunes between
two barriers (:func:`pippy.checkpoint_dcp.finish_save`). Saves into one directory from processes
outside one group must not overlap (as for DCP itself). Only DCP's own files and the mark are
deleted; a sub-directory that holds anything else is left (with a warning).

    >>> import os, tempfile, torch
    >>> from pippy import SplitPoint, checkpoint, pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> stages = [pipeline(net, 1, (torch.ones(1, 2),), split_spec={"0": SplitPoint.END}).build_stage(i, "cpu")
    ...           for i in range(2)]
    >>> with tempfile.TemporaryDirectory() as ckpt:
    ...     checkpoint.save(stages, ckpt, format="dcp")  # all at once: <ckpt>/dcp
    ...     for st in stages:                             # then per stage: dcp_stages_0, dcp_stages_1
    ...         checkpoint.save([st], ckpt, format="dcp")
    ...     sorted(d for d in os.listdir(ckpt) if d.startswith("dcp"))
    ['dcp_stages_0', 'dcp_stages_1']
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings

from pippy.checkpoint_files import read_records

__all__ = ["MARK", "mark", "prune_stale", "unmark"]

MARK = "pippy_dcp.json"
"""The file in each DCP sub-directory pippy wrote (its only proof of ownership)."""

_SUB = re.compile(r"dcp(_optim)?(_stages(_\d+)+)?")  # the names pippy.checkpoint_dcp.dcp_dirs gives
_DCP_FILES = re.compile(r"__\d+_\d+\.distcp|(__\d+)?\.metadata(\.tmp)?")


def mark(where: str) -> None:
    """Mark the DCP sub-directory ``where`` as pippy's (atomically: ranks of one save may all mark it).

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as sub:
        ...     mark(sub); unmark(sub); unmark(sub)
        ...     os.listdir(sub)
        []
    """
    fd, tmp = tempfile.mkstemp(dir=where, prefix=f".{MARK}.")
    with os.fdopen(fd, "w") as f:
        json.dump({"written_by": "pippy.checkpoint.save"}, f)
    os.replace(tmp, os.path.join(where, MARK))


def unmark(where: str) -> None:
    """Take pippy's mark from ``where`` (if any) before a save writes into it: a half-written directory is never pruned."""
    try:
        os.remove(os.path.join(where, MARK))
    except FileNotFoundError:
        pass


def _remove(sub: str) -> bool:
    """Delete DCP's files and the mark in ``sub``, then ``sub`` itself if nothing else is left."""
    foreign = []
    for entry in os.listdir(sub):
        if entry == MARK or _DCP_FILES.fullmatch(entry):
            try:
                os.remove(os.path.join(sub, entry))
            except FileNotFoundError:  # another rank pruning too
                pass
        else:
            foreign.append(entry)
    if foreign:
        warnings.warn(f"checkpoint.save: the stale DCP sub-directory {sub} (no stage_<i>.json names it) also holds "
                      f"files pippy did not write ({sorted(foreign)[:5]}); its DCP files were removed, those were "
                      "kept. Move them out and delete the directory", stacklevel=4)
        return False
    try:
        os.rmdir(sub)
    except FileNotFoundError:
        pass
    return True


def prune_stale(path: str | os.PathLike[str]) -> list[str]:
    """Remove the DCP sub-directories of checkpoint ``path`` that are stale (see above); return their names.

    Never raises on a file it cannot remove (it warns: the checkpoint itself is complete). Call it
    after every record of a save is written: on one rank of a process group, after a barrier.

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as ckpt:
        ...     prune_stale(ckpt)  # no records: nothing is known to be stale
        []
    """
    try:
        records = read_records(path)
    except (FileNotFoundError, ValueError, KeyError):
        return []  # no complete save yet (a per-stage save under way), or a directory pippy does not know
    live = {r.tensors for r in records} | {r.optim for r in records if r.optim is not None}
    removed: list[str] = []
    for entry in sorted(os.listdir(path)):
        sub = os.path.join(path, entry)
        if entry in live or not _SUB.fullmatch(entry) or not os.path.isdir(sub):
            continue
        if not os.path.isfile(os.path.join(sub, MARK)):  # not pippy's, or being written
            continue
        try:
            if _remove(sub):
                removed.append(entry)
        except FileNotFoundError:  # another rank removed it first (torch-format saves prune on every rank)
            continue
        except OSError as err:
            warnings.warn(f"checkpoint.save: could not remove the stale DCP sub-directory {sub} ({err}); no load "
                          "reads it, delete it by hand", stacklevel=3)
    return removed

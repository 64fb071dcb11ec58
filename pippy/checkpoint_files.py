"""What a pipeline checkpoint directory holds: one record per stage (``stage_<i>.json``) naming its format, keys and files.

Every :func:`pippy.checkpoint.save` writes, per stage, the record last (after the tensors), so the
records say what the newest save of each stage wrote: ``format``, the state-dict ``keys``, the tied
``aliases`` and ``files`` (``tensors``: ``stage_<i>.step<k>.pt`` or a DCP sub-directory; ``optim``: where
the optimizer state went, or ``None`` when the save had no optimizer). Loading and merging follow
the records, so files that an older save left in the same directory are never read by mistake.

    >>> import tempfile
    >>> rec = StageRecord(index=0, num_stages=2, format="dcp", keys=["0.weight"], aliases=[], tensors="dcp", optim=None)
    >>> with tempfile.TemporaryDirectory() as ckpt:
    ...     write_record(ckpt, rec)
    ...     read_record(ckpt, 0) == rec
    True
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["StageRecord", "decode_groups", "encode_groups", "read_record", "read_records", "resolve_format",
           "write_record"]

FORMATS = ("torch", "dcp")


@dataclass(frozen=True, slots=True, kw_only=True)
class StageRecord:
    """One stage's ``stage_<i>.json``: what its newest save wrote and where.

        >>> StageRecord(index=1, num_stages=2, format="torch", keys=[], aliases=[], tensors="stage_1.pt", optim=None).index
        1
    """

    index: int
    """The stage's index in the split it was saved from."""
    num_stages: int
    """How many stages that split had."""
    format: str
    """``"torch"`` or ``"dcp"``."""
    keys: list[str]
    """The stage's state-dict keys (the model's FQNs)."""
    aliases: list[list[str]]
    """Groups of FQNs that name one (tied) tensor."""
    tensors: str
    """The file (``stage_<i>.step<k>.pt``) or DCP sub-directory holding the tensors, relative to the checkpoint directory."""
    optim: str | None
    """Where the optimizer state went (``optim_<i>.step<k>.pt`` or a DCP sub-directory); ``None``: saved without one."""
    step: int = 0
    """The training steps the stage had run when saved (``Stage.steps_trained``; 0 in records of older pippy)."""
    previous: tuple[str, str | None, int] | None = None
    """torch format: the files (tensors, optimizer state) and step of this stage's save before, kept on disk."""
    run: str = ""
    """The training run that saved it (``TORCHELASTIC_RUN_ID``, or the run a ``load`` resumed); "" when unknown."""


def _name(path: str | os.PathLike[str], i: int) -> str:
    return os.path.join(path, f"stage_{i}.json")


def write_record(path: str | os.PathLike[str], record: StageRecord) -> None:
    """Write ``record`` as ``<path>/stage_<i>.json`` atomically (ranks sharing a stage may write it at once).

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as ckpt:
        ...     write_record(ckpt, StageRecord(index=3, num_stages=4, format="dcp", keys=[], aliases=[],
        ...                                    tensors="dcp", optim="dcp_optim"))
        ...     os.listdir(ckpt)
        ['stage_3.json']
    """
    side = {"stage": record.index, "num_stages": record.num_stages, "format": record.format, "keys": record.keys,
            "aliases": record.aliases, "files": {"tensors": record.tensors, "optim": record.optim},
            "step": record.step, "run": record.run,
            "previous": None if record.previous is None else dict(zip(("tensors", "optim", "step"), record.previous))}
    fd, tmp = tempfile.mkstemp(dir=path, prefix=f".stage_{record.index}.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(side, f, indent=1)
    os.replace(tmp, _name(path, record.index))


def read_record(path: str | os.PathLike[str], i: int) -> StageRecord:
    """``<path>/stage_<i>.json`` (records of older pippy versions, which lack ``files``, too).

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as ckpt:
        ...     read_record(ckpt, 0)
        Traceback (most recent call last):
        FileNotFoundError: ...stage_0.json is missing: was save() called on the rank holding stage 0?
    """
    fname = _name(path, i)
    if not os.path.exists(fname):
        raise FileNotFoundError(f"{fname} is missing: was save() called on the rank holding stage {i}?")
    with open(fname) as f:
        side: dict[str, Any] = json.load(f)
    files = side.get("files")
    if files is None:  # written before records named their files: the fixed names of that time
        tensors = f"stage_{i}.pt" if side["format"] == "torch" else "dcp"
        optim = f"optim_{i}.pt" if side["format"] == "torch" else "dcp_optim"
        files = {"tensors": tensors, "optim": optim if os.path.exists(os.path.join(path, optim)) else None}
    prev = side.get("previous")
    return StageRecord(index=side["stage"], num_stages=side["num_stages"], format=side["format"], keys=side["keys"],
                       aliases=side["aliases"], tensors=files["tensors"], optim=files["optim"],
                       step=int(side.get("step", 0)), run=str(side.get("run", "")),
                       previous=None if prev is None else (prev["tensors"], prev["optim"], int(prev["step"])))


def read_records(path: str | os.PathLike[str], *, complete: bool = True) -> list[StageRecord]:
    """The records of the checkpoint under ``path``: stages ``0 .. num_stages-1`` of its save, in order.

    ``num_stages`` is taken from the lowest-numbered record. ``complete=False`` leaves out the
    stages whose record is missing (a load of some stages needs only theirs).

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as ckpt:
        ...     read_records(ckpt)
        Traceback (most recent call last):
        FileNotFoundError: no stage_<i>.json under ...; is it a pippy checkpoint (written by pippy.checkpoint.save)?
    """
    indices = sorted(int(m.group(1)) for f in glob.glob(os.path.join(path, "stage_*.json"))
                     if (m := re.search(r"stage_(\d+)\.json$", f)))
    if not indices:
        raise FileNotFoundError(f"no stage_<i>.json under {os.fspath(path)!r}; is it a pippy checkpoint "
                                "(written by pippy.checkpoint.save)?")
    first = read_record(path, indices[0])
    records = [read_record(path, i) for i in range(first.num_stages) if complete or i in indices]
    odd = [r for r in records if r.num_stages != first.num_stages]
    if odd:
        raise ValueError(f"checkpoint {os.fspath(path)!r} mixes saves: stage_{first.index}.json is from a split of "
                         f"{first.num_stages} stages but stage_{odd[0].index}.json from one of {odd[0].num_stages}. "
                         "Save every stage of one split into a directory (or delete the older records)")
    return records


def resolve_format(records: list[StageRecord], asked: str | None, path: str | os.PathLike[str]) -> str:
    """The format the records say, checked against ``asked`` (``None``: take the recorded one).

        >>> rec = StageRecord(index=0, num_stages=1, format="dcp", keys=[], aliases=[], tensors="dcp", optim=None)
        >>> resolve_format([rec], None, "ckpt")
        'dcp'
        >>> resolve_format([rec], "torch", "ckpt")
        Traceback (most recent call last):
        ValueError: load(..., format='torch') but checkpoint 'ckpt' was saved with format='dcp' (...): pass format='dcp' ...
    """
    if asked is not None and asked not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} (or None: the one the checkpoint was saved with), "
                         f"got {asked!r}")
    found = sorted({r.format for r in records})
    if len(found) > 1:
        which = {f: [r.index for r in records if r.format == f] for f in found}
        raise ValueError(f"checkpoint {os.fspath(path)!r} mixes formats: stages {which} (from stage_<i>.json); "
                         "save every stage with the same format")
    if asked is not None and asked != found[0]:
        stale = "; any stage_<i>.step<k>.pt there is from an older save" if found[0] == "dcp" else ""
        raise ValueError(f"load(..., format={asked!r}) but checkpoint {os.fspath(path)!r} was saved with "
                         f"format={found[0]!r} (its stage_<i>.json{stale}): pass format={found[0]!r} or leave "
                         "format out")
    return found[0]


def encode_groups(groups: list[dict[str, Any]], what: str) -> bytes:
    """Param groups (hyperparameters, FQN lists) as bytes that :func:`decode_groups` turns back, tensors and tuples kept.

    Refuses values that a safe ``torch.load`` (``weights_only=True``) could not read back, naming them.

        >>> g = [{"lr": torch.tensor(0.01), "betas": (0.9, 0.99), "params": ["0.weight"]}]
        >>> back = decode_groups(encode_groups(g, "stage 0"))
        >>> back[0]["betas"], back[0]["lr"]
        ((0.9, 0.99), tensor(0.0100))
    """
    buf = io.BytesIO()
    torch.save(groups, buf)
    data = buf.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:
        odd = [f"group {j} {k}={type(v).__name__}" for j, g in enumerate(groups) for k, v in g.items()
               if not isinstance(v, torch.Tensor | int | float | bool | str | tuple | list | dict | type(None))]
        raise ValueError(f"{what}: the optimizer's param groups hold values a checkpoint cannot store safely "
                         f"({', '.join(odd) or err}); expected tensors, numbers, strings, tuples, lists or dicts. "
                         "Keep other objects out of the param groups (nothing was written)") from err
    return data


def decode_groups(value: bytes | str) -> list[dict[str, Any]]:
    """Param groups stored by :func:`encode_groups` (or as JSON, by older pippy versions).

        >>> decode_groups('[{"lr": 0.1, "params": ["w"]}]')
        [{'lr': 0.1, 'params': ['w']}]
    """
    if isinstance(value, str):
        groups: list[dict[str, Any]] = json.loads(value)
        return groups
    return torch.load(io.BytesIO(value), weights_only=True)  # type: ignore[no-any-return]

"""Pipeline checkpoints: each rank saves and loads its own stages by original FQN; ``merge`` rebuilds the model's.

Two formats. ``"torch"`` writes ``stage_<i>.step<k>.pt`` per stage (plain ``torch.save`` state_dicts), so a
rank touches only its own files. ``"dcp"`` writes a torch.distributed.checkpoint keyed by FQN per
save call (``<dir>/dcp`` when the call saves every stage; see :mod:`pippy.checkpoint_dcp`); it can
be loaded into a different split. Either way every stage also writes ``stage_<i>.json`` (its
format, keys, files and the tied-weight alias groups it knows about; :mod:`pippy.checkpoint_files`).
``load`` and ``merge`` follow those records: the format, the files, and, when a stage needs a tied
tensor under a name it was not saved under, its alias. ``merge`` gives every alias of a tied
tensor its value, so the result loads with ``strict=True`` into the unpipelined model.

In a real run each rank saves the stages it holds; here one process holds both stages:

    >>> import tempfile, torch, pippy
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> pipe = pippy.pipeline(net, 2, example_args=(torch.randn(4, 4),), split_spec={"0": pippy.SplitPoint.END})
    >>> stages = [pipe.build_stage(i, "cpu") for i in range(pipe.num_stages)]
    >>> with tempfile.TemporaryDirectory() as ckpt:
    ...     save(stages, ckpt)  # on every rank, its own stages
    ...     net.load_state_dict(merge(ckpt), strict=True)  # anywhere, once every rank has saved
    <All keys matched successfully>
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from pippy.checkpoint_agree import settle
from pippy.checkpoint_dcp import (
    call_dirs,
    finish_save,
    load_stage_optim,
    load_stage_tensors,
    read_dcp,
    save_dcp,
    saved_keys,
)
from pippy.checkpoint_files import StageRecord, encode_groups, read_record, read_records, resolve_format, write_record
from pippy.checkpoint_prune import prune_stale
from pippy.checkpoint_steps import atomic_save, file_names, newest_complete, previous_files, prune_older, run_of
from pippy.frontend.compiled import uncompiled
from pippy.frontend.params import is_lifted_constant, name_groups
from pippy.runtime.optim_state import load_stage_optimizer_states, stage_optimizer_states
from pippy.runtime.stage import Stage

__all__ = ["load", "merge", "save"]

_FORMATS = ("torch", "dcp")


def _as_list(stages: Stage | Sequence[Stage]) -> list[Stage]:
    return [stages] if isinstance(stages, Stage) else list(stages)


def _check_format(fmt: str) -> None:
    if fmt not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {fmt!r}")


def _alias_groups(stage: Stage, model: nn.Module | None) -> list[list[str]]:
    mine = set(stage.state_dict())
    return [g for g in name_groups(stage.pipe, model) if mine.intersection(g)]


def save(
    stages: Stage | Sequence[Stage],
    path: str | os.PathLike[str],
    *,
    format: str = "torch",
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Save this rank's ``stages`` under directory ``path`` (call on every rank).

    ``optimizer`` (the one optimizing this rank's stages) saves its state too, keyed by parameter
    FQN (``optim_<i>.step<k>.pt`` per stage, or ``ckpt/dcp_optim``), hyperparameters included (tensors and
    tuples kept); :func:`load` with the same ``optimizer=`` restores it, so a resumed run continues
    exactly. Nothing is written when a value cannot be stored.

    ``model`` (optional, may be on the meta device) adds alias names the pipe cannot see, such as
    a tied tensor no stage reads under that name (T5's ``shared.weight``).

    With ``format="dcp"`` (``save(stage, "ckpt", format="dcp")`` on every rank) the tensors go to
    a torch.distributed.checkpoint under ``ckpt/dcp`` instead of ``stage_<i>.step<k>.pt``. Calls that save
    some of the stages each (one optimizer per stage) write one sub-directory per call
    (``ckpt/dcp_stages_0_1``), so the stages of every call are kept. Once every stage's record names
    its new sub-directory, the DCP sub-directories an older save left that no record names are
    removed (only those pippy wrote; see :mod:`pippy.checkpoint_prune`).

        >>> import os, tempfile, torch, pippy
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> pipe = pippy.pipeline(net, 2, (torch.randn(4, 4),), split_spec={"0": pippy.SplitPoint.END})
        >>> with tempfile.TemporaryDirectory() as ckpt:
        ...     save([pipe.build_stage(i, "cpu") for i in range(2)], ckpt)
        ...     sorted(os.listdir(ckpt))
        ['stage_0.json', 'stage_0.step0.pt', 'stage_1.json', 'stage_1.step0.pt']
    """
    _check_format(format)
    stages = _as_list(stages)
    if format == "torch":
        _refuse_sharded(stages, "save")
    # everything is gathered and checked before the first file is written
    sds = {st.index: st.state_dict() for st in stages}
    optim = stage_optimizer_states(stages, optimizer) if optimizer is not None else {}
    groups = {i: encode_groups(osd["param_groups"], f"checkpoint.save, stage {i}") for i, osd in optim.items()}
    tensors_dir, optim_dir = call_dirs(stages) if format == "dcp" else ("", "")
    os.makedirs(path, exist_ok=True)
    files = {st.index: file_names(st.index, st.steps_trained, optimizer is not None) for st in stages}
    if format == "torch":
        for st in stages:
            tensors, optim_file = files[st.index]
            atomic_save({k: v.detach().cpu() for k, v in sds[st.index].items()}, os.path.join(path, tensors))
            if optim_file is not None:
                atomic_save(optim[st.index], os.path.join(path, optim_file))
    else:
        save_dcp({k: v for sd in sds.values() for k, v in sd.items()}, os.path.join(path, tensors_dir))
        if optimizer is not None:
            payload: dict[str, Any] = {"state": {k: v for osd in optim.values() for k, v in osd["state"].items()}}
            payload.update({f"param_groups_stage{i}": g for i, g in groups.items()})  # hyperparameters per stage
            save_dcp(payload, os.path.join(path, optim_dir))
    for st in stages:  # the records last: they name what this save wrote
        rec = StageRecord(index=st.index, num_stages=st.num_stages, format=format, keys=sorted(sds[st.index]),
                          aliases=_alias_groups(st, model), tensors=tensors_dir,
                          optim=None if optimizer is None else optim_dir)
        prev = None
        if format == "torch":  # the files of this step, and the save before them kept (see pippy.checkpoint_steps)
            prev = previous_files(path, st.index, st.num_stages, st.steps_trained, run_of(st))
            rec = dataclasses.replace(rec, tensors=files[st.index][0], optim=files[st.index][1],
                                      previous=prev)
        write_record(path, dataclasses.replace(rec, step=st.steps_trained, run=run_of(st)))
        if format == "torch":
            prune_older(path, st.index, {f for f in (*files[st.index], *(prev or ())[:2]) if isinstance(f, str)})
    if format == "dcp":
        finish_save(path)  # a DCP load reads every stage's record: all written before any rank goes on
    else:
        prune_stale(path)  # DCP sub-directories of an older save (no torch-format file is ever removed)


def _load_torch_optimizer(stages: list[Stage], optimizer: torch.optim.Optimizer, path: str | os.PathLike[str],
                          records: dict[int, StageRecord]) -> None:
    per_stage: dict[int, Any] = {}
    for st in stages:
        rec = records[st.index]
        if rec.optim is None:
            raise FileNotFoundError(f"stage {st.index} of checkpoint {os.fspath(path)!r} was saved without an optimizer "
                                    f"(stage_{st.index}.json); save(..., optimizer=opt) to resume one, or load "
                                    "without optimizer=")
        fname = os.path.join(path, rec.optim)
        if not os.path.exists(fname):
            raise FileNotFoundError(f"{fname} is missing: was save(..., optimizer=...) called for stage {st.index}?")
        per_stage[st.index] = torch.load(fname, map_location=st.device, weights_only=True)
    load_stage_optimizer_states(stages, optimizer, per_stage)


def load(
    stages: Stage | Sequence[Stage],
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Load this rank's ``stages`` in place from a checkpoint written by :func:`save` (and ``optimizer``'s state).

    ``format`` defaults to the one the checkpoint was saved with (its ``stage_<i>.json``); a
    different one is refused. The ``"torch"`` format needs the same split; ``"dcp"`` loads by FQN
    (or a tied alias) into any split. To load a merged (unpipelined) state_dict instead, use
    ``materialize_stage(stage, checkpoint=sd)``. Each param group of ``optimizer`` takes the
    hyperparameters of the saved group that held its parameters (matched by FQN, not by position).

    A ``"dcp"`` load, like its save, is called by every rank as often (a rank holding no stage
    passes ``[]``): when it fails on one rank (an FQN that rank's stages want and the checkpoint
    lacks), every rank raises, naming the failed ranks and their errors (:mod:`pippy.checkpoint_agree`),
    rather than the others running on into a collective that waits for the failed rank.

        >>> import tempfile, torch, pippy
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> pipe = pippy.pipeline(net, 2, (torch.randn(4, 4),), split_spec={"0": pippy.SplitPoint.END})
        >>> stages = [pipe.build_stage(i, "cpu") for i in range(2)]
        >>> with tempfile.TemporaryDirectory() as ckpt:
        ...     save(stages, ckpt)
        ...     with torch.no_grad():
        ...         _ = stages[1].state_dict()["1.weight"].zero_()  # lose a weight
        ...     load(stages, ckpt)
        >>> torch.equal(stages[1].state_dict()["1.weight"], net[1].weight)
        True
    """
    stages = _as_list(stages)
    try:
        fmt = resolve_format(read_records(path, complete=False), format, path)
    except Exception as unread:
        if format == "dcp":
            settle(path, unread)  # the other ranks wait for this rank's outcome: they raise with it
        raise
    if fmt == "dcp":
        failed: Exception | None = None
        try:
            _load_dcp(stages, path, optimizer)
        except Exception as err:
            failed = err
        settle(path, failed)  # every rank raises if one failed (e.g. an FQN missing on one rank), none waits on
        return
    records = newest_complete(read_records(path, complete=False), path, "checkpoint.load")
    by_index = {r.index: r for r in records}
    _refuse_sharded(stages, "load")
    for st in stages:
        if records[0].num_stages != st.num_stages:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} was saved from {records[0].num_stages} stages but this pipe has "
                f"{st.num_stages}; load merge(path) with materialize_stage(stage, checkpoint=...), or save with "
                "format='dcp', which loads into any split"
            )
        rec = by_index[st.index] if st.index in by_index else read_record(path, st.index)  # the latter raises
        sd = torch.load(os.path.join(path, rec.tensors), map_location=st.device, weights_only=True)
        missing, unexpected = st.unwrapped.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not is_lifted_constant(k)]
        if missing or unexpected:
            raise KeyError(f"stage {st.index}: checkpoint keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None:
        _load_torch_optimizer(stages, optimizer, path, by_index)
    for st in stages:  # a resumed run counts on from the step loaded (its next save replaces a cut-off one)
        st.steps_trained = by_index[st.index].step
        st.checkpoint_run = by_index[st.index].run or run_of(st)  # and saves as the run it resumed


def _load_dcp(stages: list[Stage], path: str | os.PathLike[str], optimizer: torch.optim.Optimizer | None) -> None:
    records = read_records(path)  # DCP routes every FQN through every stage's record
    load_stage_tensors(stages, path, records)
    if optimizer is not None:
        load_stage_optim(stages, optimizer, path, records)
    for st in stages:  # one collective save: one step and run (any split)
        st.steps_trained = min(r.step for r in records)
        st.checkpoint_run = records[0].run or run_of(st)


def _refuse_sharded(stages: list[Stage], what: str) -> None:
    """``format="torch"`` keeps one file per stage, so a stage sharded over ranks (FSDP2, tensor parallel) needs DCP:
    data-parallel ranks would each write their own shard to the same file, and read back another rank's."""
    for st in stages:
        sharded = [k for k, v in st.state_dict().items() if isinstance(v, DTensor)]
        if sharded:
            raise ValueError(
                f"checkpoint.{what}: stage {st.index} holds sharded tensors (DTensor: {sharded[:3]}, from FSDP2 or "
                f"tensor parallelism), but format='torch' keeps one whole file per stage, which the ranks sharing "
                f"the stage would overwrite with their own shards. Use {what}(stages, path, format='dcp') on every "
                "rank (merge(path) still gives the plain model's state dict)"
            )


def _read_stage_files(path: str | os.PathLike[str], records: list[StageRecord]) -> dict[str, torch.Tensor]:
    """Every recorded key of every stage, from the file or DCP sub-directory its record names."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for r in records:
        where = os.path.join(path, r.tensors)
        if r.tensors not in files:
            if r.format == "dcp":
                saved_keys(where, r)  # a clear error when it is missing
                files[r.tensors] = read_dcp(where)
            elif not os.path.exists(where):
                raise FileNotFoundError(f"{where} is missing, but stage_{r.index}.json says stage {r.index} was saved there")
            else:
                files[r.tensors] = torch.load(where, map_location="cpu", weights_only=True)
        lacking = [k for k in r.keys if k not in files[r.tensors]]
        if lacking:
            raise KeyError(f"checkpoint {os.fspath(path)!r} is incomplete: stage_{r.index}.json records {lacking[:5]} in "
                           f"{r.tensors}, which lacks them (overwritten by a later save of other stages?); save every "
                           "stage again")
        for k in r.keys:
            out.setdefault(k, files[r.tensors][k])
    return out


def merge(path: str | os.PathLike[str], *, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """One state_dict for the unpipelined model from every stage's files, each tied alias filled in.

    With ``model``, aliases are also taken from it and the result is checked against
    ``model.state_dict()``'s keys (the error names any that are missing; a ``torch.compile``'d model's
    without their ``_orig_mod.``, as stages name them). Stages sharded with
    FSDP2 are saved with ``format="dcp"``; ``merge`` then returns the full tensors. Every key a
    stage's ``stage_<i>.json`` records must be in that stage's files, else the error names it.

        >>> import tempfile, torch, pippy
        >>> lin = torch.nn.Linear(4, 4)
        >>> net = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)  # one Linear under two names (tied)
        >>> pipe = pippy.pipeline(net, 2, (torch.randn(4, 4),), split_spec={"1": pippy.SplitPoint.END})
        >>> with tempfile.TemporaryDirectory() as ckpt:
        ...     save([pipe.build_stage(i, "cpu") for i in range(2)], ckpt)
        ...     sd = merge(ckpt, model=net)
        >>> sorted(sd), torch.equal(sd["0.weight"], sd["2.weight"])
        (['0.bias', '0.weight', '2.bias', '2.weight'], True)
    """
    records = newest_complete(read_records(path), path, "checkpoint.merge")
    out = _read_stage_files(path, records)
    groups = [g for r in records for g in r.aliases]
    model = uncompiled(model) if model is not None else None  # torch.compile(model): the model's own keys
    if model is not None:
        by_id: dict[int, list[str]] = {}
        for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            by_id.setdefault(id(t), []).append(n)
        groups += [v for v in by_id.values() if len(v) > 1]
    for _ in range(2):  # groups may chain through each other
        for g in groups:
            have = next((out[n] for n in g if n in out), None)
            if have is not None:
                for n in g:
                    out.setdefault(n, have)
    if model is not None:
        missing = sorted(set(model.state_dict()) - set(out))
        if missing:
            raise KeyError(
                f"the pipeline checkpoint lacks {missing[:6]}{' ...' if len(missing) > 6 else ''}: no stage reads "
                "them in the traced forward, so no stage holds them; take them from the original model"
            )
    return out

"""Pipeline checkpoints: each rank saves and loads its own stages by original FQN; ``merge`` rebuilds the model's.

Two formats. ``"torch"`` writes ``stage_<i>.pt`` per stage (plain ``torch.save`` state_dicts), so a
rank touches only its own files. ``"dcp"`` writes one torch.distributed.checkpoint under
``<dir>/dcp`` keyed by FQN; it can be loaded into a different split. Either way every stage also
writes ``stage_<i>.json`` (its keys and the tied-weight alias groups it knows about), which
``merge`` uses to give every alias of a tied tensor its value, so the result loads with
``strict=True`` into the unpipelined model.

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

import glob
import json
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

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
    FQN (``optim_<i>.pt`` per stage, or ``ckpt/dcp_optim``); :func:`load` with the same
    ``optimizer=`` restores it, so a resumed run continues exactly.

    ``model`` (optional, may be on the meta device) adds alias names the pipe cannot see, such as
    a tied tensor no stage reads under that name (T5's ``shared.weight``).

    With ``format="dcp"`` (``save(stage, "ckpt", format="dcp")`` on every rank) the tensors go to
    one torch.distributed.checkpoint under ``ckpt/dcp`` instead of ``stage_<i>.pt``.

        >>> import os, tempfile, torch, pippy
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> pipe = pippy.pipeline(net, 2, (torch.randn(4, 4),), split_spec={"0": pippy.SplitPoint.END})
        >>> with tempfile.TemporaryDirectory() as ckpt:
        ...     save([pipe.build_stage(i, "cpu") for i in range(2)], ckpt)
        ...     sorted(os.listdir(ckpt))
        ['stage_0.json', 'stage_0.pt', 'stage_1.json', 'stage_1.pt']
    """
    _check_format(format)
    stages = _as_list(stages)
    if format == "torch":
        _refuse_sharded(stages, "save")
    os.makedirs(path, exist_ok=True)
    merged: dict[str, torch.Tensor] = {}
    for st in stages:
        sd = st.state_dict()
        side = {"stage": st.index, "num_stages": st.num_stages, "format": format, "keys": sorted(sd),
                "aliases": _alias_groups(st, model)}
        with open(os.path.join(path, f"stage_{st.index}.json"), "w") as f:
            json.dump(side, f, indent=1)
        if format == "torch":
            torch.save({k: v.detach().cpu() for k, v in sd.items()}, os.path.join(path, f"stage_{st.index}.pt"))
        else:
            merged.update(sd)
    if format == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.save(merged, checkpoint_id=os.path.join(path, "dcp"))
    if optimizer is not None:
        _save_optimizer(stages, optimizer, path, format)


def _save_optimizer(stages: list[Stage], optimizer: torch.optim.Optimizer, path: str | os.PathLike[str],
                    fmt: str) -> None:
    per_stage = stage_optimizer_states(stages, optimizer)
    if fmt == "torch":
        for i, osd in per_stage.items():
            torch.save(osd, os.path.join(path, f"optim_{i}.pt"))
        return
    import torch.distributed.checkpoint as dcp

    payload: dict[str, Any] = {"state": {k: v for osd in per_stage.values() for k, v in osd["state"].items()}}
    for i, osd in per_stage.items():  # hyperparameters per stage (lr, betas, ...), as JSON
        payload[f"param_groups_stage{i}"] = json.dumps(osd["param_groups"])
    dcp.save(payload, checkpoint_id=os.path.join(path, "dcp_optim"))


def _load_optimizer(stages: list[Stage], optimizer: torch.optim.Optimizer, path: str | os.PathLike[str],
                    fmt: str) -> None:
    if fmt == "torch":
        per_stage: dict[int, Any] = {}
        for st in stages:
            fname = os.path.join(path, f"optim_{st.index}.pt")
            if not os.path.exists(fname):
                raise FileNotFoundError(f"{fname} is missing: was save(..., optimizer=...) called for stage {st.index}?")
            per_stage[st.index] = torch.load(fname, map_location=st.device, weights_only=True)
        load_stage_optimizer_states(stages, optimizer, per_stage)
        return
    import torch.distributed.checkpoint as dcp

    where = os.path.join(path, "dcp_optim")
    if not os.path.isdir(where):
        raise FileNotFoundError(f"{where} is missing: was save(..., format='dcp', optimizer=...) called?")
    saved_keys = set(dcp.FileSystemReader(where).read_metadata().state_dict_metadata)
    template = stage_optimizer_states(stages, optimizer, template=True)  # this split's parameters; tensors filled by DCP
    saved_state = {k.removeprefix("state.") for k in saved_keys if k.startswith("state.")}
    payload: dict[str, Any] = {"state": {k: v for osd in template.values() for k, v in osd["state"].items()
                                         if any(s == k or s.startswith(k + ".") for s in saved_state)}}
    if saved_state and not payload["state"] and any(osd["state"] for osd in template.values()):
        raise KeyError(f"{where}: the checkpoint's optimizer state is for {sorted(saved_state)[:3]}, none of which are "
                       f"this split's parameters {sorted(k for osd in template.values() for k in osd['state'])[:3]}; "
                       "was it saved from the same model and optimizer?")
    groups = sorted(k for k in saved_keys if k.startswith("param_groups_stage"))  # every saved stage's hyperparameters
    payload.update({k: "" for k in groups})
    dcp.load(payload, checkpoint_id=where)
    for i, osd in template.items():
        osd["state"] = {k: payload["state"][k] for k in osd["state"] if k in payload["state"]}
        # a stage of another split takes the hyperparameters (lr, betas: one optimizer's groups) of any saved stage
        key = f"param_groups_stage{i}" if payload.get(f"param_groups_stage{i}") else next(
            (k for k in groups if payload.get(k)), None)
        if key is not None:
            saved = json.loads(payload[key])
            osd["param_groups"] = [{**g, **{k: v for k, v in s.items() if k != "params"}}
                                   for g, s in zip(osd["param_groups"], saved)]
    load_stage_optimizer_states(stages, optimizer, template)


def load(
    stages: Stage | Sequence[Stage],
    path: str | os.PathLike[str],
    *,
    format: str = "torch",
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Load this rank's ``stages`` in place from a checkpoint written by :func:`save` (and ``optimizer``'s state).

    The ``"torch"`` format needs the same split; ``"dcp"`` loads by FQN into any split. To load a
    merged (unpipelined) state_dict instead, use ``materialize_stage(stage, checkpoint=sd)``.

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
    _check_format(format)
    if format == "torch":
        _refuse_sharded(_as_list(stages), "load")
    for st in _as_list(stages):
        if format == "dcp":
            import torch.distributed.checkpoint as dcp

            sd = st.state_dict()
            dcp.load(sd, checkpoint_id=os.path.join(path, "dcp"))
            continue
        side = _read_side(path, st.index)
        if side["num_stages"] != st.num_stages:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} was saved from {side['num_stages']} stages but this pipe has "
                f"{st.num_stages}; load merge(path) with materialize_stage(stage, checkpoint=...) or use format='dcp'"
            )
        sd = torch.load(os.path.join(path, f"stage_{st.index}.pt"), map_location=st.device, weights_only=True)
        missing, unexpected = st.unwrapped.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not is_lifted_constant(k)]
        if missing or unexpected:
            raise KeyError(f"stage {st.index}: checkpoint keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None:
        _load_optimizer(_as_list(stages), optimizer, path, format)


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


def _read_side(path: str | os.PathLike[str], i: int) -> dict[str, Any]:
    fname = os.path.join(path, f"stage_{i}.json")
    if not os.path.exists(fname):
        raise FileNotFoundError(f"{fname} is missing: was save() called on the rank holding stage {i}?")
    with open(fname) as f:
        side: dict[str, Any] = json.load(f)
    return side


def merge(path: str | os.PathLike[str], *, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """One state_dict for the unpipelined model from every stage's files, each tied alias filled in.

    With ``model``, aliases are also taken from it and the result is checked against
    ``model.state_dict()``'s keys (the error names any that are missing). Stages sharded with
    FSDP2 are saved with ``format="dcp"``; ``merge`` then returns the full tensors.

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
    indices = sorted(int(m.group(1)) for f in glob.glob(os.path.join(path, "stage_*.json"))
                     if (m := re.search(r"stage_(\d+)\.json$", f)))
    if not indices:
        raise FileNotFoundError(f"no stage_<i>.json under {os.fspath(path)!r}; is it a pippy checkpoint?")
    sides = [_read_side(path, i) for i in range(_read_side(path, indices[0])["num_stages"])]
    out: dict[str, torch.Tensor] = {}
    if sides[0]["format"] == "dcp":
        out = _read_dcp(os.path.join(path, "dcp"))
    else:
        for side in sides:
            sd = torch.load(os.path.join(path, f"stage_{side['stage']}.pt"), map_location="cpu", weights_only=True)
            for k, v in sd.items():
                out.setdefault(k, v)
    groups = [g for side in sides for g in side["aliases"]]
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


def _read_dcp(dcp_dir: str) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        fname = os.path.join(tmp, "merged.pt")
        dcp_to_torch_save(dcp_dir, fname)
        sd: dict[str, torch.Tensor] = torch.load(fname, map_location="cpu", weights_only=True)
    return sd

"""The DCP side of pippy checkpoints: one torch.distributed.checkpoint per save call, read back by FQN into any split.

A save call writes the stages every rank passes to it into one DCP sub-directory, ``dcp`` when they are
all the split's stages, else ``dcp_stages_<i>_<j>...`` (so saving stage by stage, e.g. with one
optimizer per stage, keeps every stage); the optimizer state goes to ``dcp_optim`` (or
``dcp_optim_stages_...``). Each stage's record (:mod:`pippy.checkpoint_files`) names its
sub-directories. Loading routes every tensor a stage wants, by its FQN or a tied alias, to the
sub-directory that holds it; each rank reads on its own (no collective), so ranks may hold
different numbers of stages (:func:`pippy.checkpoint.load` then settles the outcome on every rank,
:mod:`pippy.checkpoint_agree`).

    >>> dcp_dirs(range(4), 4), dcp_dirs([0, 3], 4)
    (('dcp', 'dcp_optim'), ('dcp_stages_0_3', 'dcp_optim_stages_0_3'))
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from pippy.checkpoint_files import StageRecord, decode_groups
from pippy.checkpoint_prune import mark, prune_stale, unmark
from pippy.frontend.cudadevice import barrier, on_collective_device
from pippy.runtime.optim_state import load_stage_optimizer_states, stage_optimizer_states
from pippy.runtime.stage import Stage

__all__ = ["SavedIndex", "call_dirs", "dcp_dirs", "finish_save", "load_dcp", "load_stage_optim", "load_stage_tensors",
           "read_dcp", "save_dcp", "saved_keys"]


def dcp_dirs(indices: Iterable[int], num_stages: int) -> tuple[str, str]:
    """The sub-directories (tensors, optimizer state) of a save call covering stages ``indices`` of ``num_stages``.

        >>> dcp_dirs([1], 2)
        ('dcp_stages_1', 'dcp_optim_stages_1')
    """
    got = sorted(set(indices))
    if got == list(range(num_stages)):
        return "dcp", "dcp_optim"
    tag = "_stages_" + "_".join(map(str, got))
    return "dcp" + tag, "dcp_optim" + tag


def call_dirs(stages: Sequence[Stage]) -> tuple[str, str]:
    """:func:`dcp_dirs` for this save call: the stages of every rank (gathered, as ``dcp.save`` is collective).

        >>> import torch, pippy
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> pipe = pippy.pipeline(net, 1, (torch.ones(1, 2),), split_spec={"0": pippy.SplitPoint.END})
        >>> call_dirs([pipe.build_stage(1, "cpu")])  # one process: this call's stages only
        ('dcp_stages_1', 'dcp_optim_stages_1')
    """
    mine = ([st.index for st in stages], stages[0].num_stages if stages else 0)
    everyone: list[Any] = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        with on_collective_device():  # NCCL gathers objects on the current CUDA device
            dist.all_gather_object(everyone, mine)
    return dcp_dirs([i for idx, _ in everyone for i in idx], max(n for _, n in everyone))


def save_dcp(state: dict[str, Any], where: str) -> None:
    """``dcp.save`` (collective: every rank calls it with its part); :func:`load_dcp` and :func:`read_dcp` read it.

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as ckpt:
        ...     save_dcp({"w": torch.ones(2)}, os.path.join(ckpt, "dcp"))
        ...     back = {"w": torch.zeros(2)}
        ...     load_dcp(back, os.path.join(ckpt, "dcp"))
        ...     back["w"].tolist(), read_dcp(os.path.join(ckpt, "dcp"))["w"].tolist()
        ([1.0, 1.0], [1.0, 1.0])
    """
    import torch.distributed.checkpoint as dcp

    if os.path.isdir(where):
        unmark(where)  # half written: not pruned as stale meanwhile
    dcp.save(state, checkpoint_id=where)
    mark(where)  # pippy's, whole (pippy.checkpoint_prune)


def finish_save(path: str | os.PathLike[str]) -> None:
    """End a collective save once every rank has written its records: then one rank prunes stale sub-directories.

    With several ranks: a barrier, rank 0 runs :func:`pippy.checkpoint_prune.prune_stale` on
    ``path``, a barrier (no rank saves into a directory being removed).

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as ckpt:
        ...     finish_save(ckpt)  # one process: no one to wait for; nothing stale
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        barrier()  # under NCCL on this process's CUDA device
        if dist.get_rank() == 0:
            prune_stale(path)
        barrier()
    else:
        prune_stale(path)


def load_dcp(request: dict[str, Any], where: str) -> None:
    """Fill ``request`` in place from the DCP checkpoint at ``where``, on this rank alone (no collective).

        >>> load_dcp({}, "/nonexistent")  # nothing asked: nothing read
    """
    import torch.distributed.checkpoint as dcp

    if not request:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(request, checkpoint_id=where, no_dist=True)


def saved_keys(where: str, record: StageRecord) -> set[str]:
    """The keys the DCP checkpoint at ``where`` holds (its metadata; no tensor is read).

        >>> rec = StageRecord(index=0, num_stages=1, format="dcp", keys=[], aliases=[], tensors="dcp", optim=None)
        >>> saved_keys("/nonexistent/dcp", rec)
        Traceback (most recent call last):
        FileNotFoundError: /nonexistent/dcp is missing, but stage_0.json says stage 0 was saved there
    """
    import torch.distributed.checkpoint as dcp

    if not os.path.isdir(where):
        raise FileNotFoundError(f"{where} is missing, but stage_{record.index}.json says stage {record.index} was "
                                "saved there")
    return set(dcp.FileSystemReader(where).read_metadata().state_dict_metadata)


def _check_recorded(path: str | os.PathLike[str], records: Sequence[StageRecord]) -> dict[str, set[str]]:
    """Every record's keys must be in its DCP sub-directory; return each sub-directory's keys."""
    held: dict[str, set[str]] = {}
    for r in records:
        if r.tensors not in held:
            held[r.tensors] = saved_keys(os.path.join(path, r.tensors), r)
        lacking = [k for k in r.keys if k not in held[r.tensors]]
        if lacking:
            raise KeyError(
                f"checkpoint {os.fspath(path)!r} is incomplete: stage_{r.index}.json records {lacking[:5]} in "
                f"{r.tensors}/, but that DCP checkpoint lacks them (a later save of other stages overwrote it, as "
                "format='dcp' saves called once per stage did before pippy gave each call its own directory); "
                "save every stage again"
            )
    return held


def _aliases(records: Sequence[StageRecord]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in records:
        for g in r.aliases:
            for n in g:
                names = out.setdefault(n, [])
                for a in g:
                    if a != n and a not in names:
                        names.append(a)
    return out


class SavedIndex:
    """Which saved stage holds a name (or a tied alias of it), preferring the stage of the same index.

        >>> recs = [StageRecord(index=0, num_stages=2, format="dcp", keys=["wte.weight"], aliases=[["head.weight",
        ...         "wte.weight"]], tensors="dcp", optim=None)]
        >>> rec, key = SavedIndex(recs).source("head.weight", 1)
        >>> rec.index, key
        (0, 'wte.weight')
    """

    def __init__(self, records: Sequence[StageRecord]) -> None:
        self.records = list(records)
        self.keys = {r.index: set(r.keys) for r in records}
        self.aliases = _aliases(records)

    def source(self, name: str, index: int, has: Callable[[StageRecord, str], bool] | None = None,
               ) -> tuple[StageRecord, str] | None:
        """The record and saved name for ``name`` of stage ``index``: ``name`` itself first, then its aliases.

        ``has(record, name)`` narrows the records that count (e.g. to those with optimizer state for it).
        """
        for n in [name, *self.aliases.get(name, [])]:
            holders = [r for r in self.records if n in self.keys[r.index] and (has is None or has(r, n))]
            if holders:
                return next((r for r in holders if r.index == index), holders[0]), n
        return None


def load_stage_tensors(stages: Sequence[Stage], path: str | os.PathLike[str], records: Sequence[StageRecord]) -> None:
    """Load every state-dict tensor of ``stages`` from the DCP checkpoint at ``path``, by FQN or tied alias.

    ``records`` are the checkpoint's (:func:`pippy.checkpoint_files.read_records`); every key they
    list must be in the sub-directory they name. Here a 2-stage checkpoint loads into 1 stage:

        >>> import tempfile, torch, pippy
        >>> from pippy.checkpoint_files import read_records
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> pipe = pippy.pipeline(net, 1, (torch.ones(1, 2),), split_spec={"0": pippy.SplitPoint.END})
        >>> one = pippy.pipeline(net, 1, (torch.ones(1, 2),)).build_stage(0, "cpu")  # the whole model
        >>> with tempfile.TemporaryDirectory() as ckpt:
        ...     pippy.checkpoint.save([pipe.build_stage(i, "cpu") for i in range(2)], ckpt, format="dcp")
        ...     with torch.no_grad():
        ...         _ = one.submod.get_parameter("1.weight").zero_()
        ...     load_stage_tensors([one], ckpt, read_records(ckpt))
        >>> torch.equal(one.submod.get_parameter("1.weight"), net[1].weight)
        True
    """
    _check_recorded(path, records)
    plan: dict[tuple[str, str], list[torch.Tensor]] = {}
    missing: dict[int, list[str]] = {}
    index = SavedIndex(records)
    for st in stages:
        for k, t in st.state_dict().items():
            src = index.source(k, st.index)
            if src is None:
                missing.setdefault(st.index, []).append(k)
            else:
                plan.setdefault((src[0].tensors, src[1]), []).append(t)
    if missing:
        raise KeyError(
            f"checkpoint {os.fspath(path)!r} holds no tensor for {', '.join(f'stage {i} {ks[:5]}' for i, ks in missing.items())}"
            f" (nor for a tied alias; its stages hold e.g. {sorted(records[0].keys)[:3]}): was it saved from the "
            "same model?"
        )
    for sub in sorted({s for s, _ in plan}):
        load_dcp({key: ts[0] for (s, key), ts in plan.items() if s == sub}, os.path.join(path, sub))
    with torch.no_grad():
        for ts in plan.values():
            for t in ts[1:]:
                if t is not ts[0]:
                    t.copy_(ts[0])


def read_dcp(dcp_dir: str) -> dict[str, torch.Tensor]:
    """A whole DCP checkpoint as a plain state dict of CPU tensors (for ``merge``; example at :func:`save_dcp`)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        fname = os.path.join(tmp, "merged.pt")
        dcp_to_torch_save(dcp_dir, fname)
        sd: dict[str, torch.Tensor] = torch.load(fname, map_location="cpu", weights_only=True)
    return sd


def _state_prefixes(keys: Iterable[str]) -> set[str]:
    """Every dotted prefix of the DCP keys ``state.<fqn>.<field>``: an FQN is in it iff the checkpoint holds its state."""
    out: set[str] = set()
    for k in keys:
        if k.startswith("state."):
            parts = k[len("state."):].split(".")
            out.update(".".join(parts[:n]) for n in range(1, len(parts)))
    return out


def load_stage_optim(stages: Sequence[Stage], optimizer: torch.optim.Optimizer, path: str | os.PathLike[str],
                     records: Sequence[StageRecord]) -> None:
    """Load ``optimizer``'s state for ``stages`` from the DCP checkpoint at ``path``, by FQN into any split.

    Every stage's copy of a parameter (a tied weight, one FQN in two stages on this rank) gets its own
    state tensors; a parameter the saved run had no state for (no gradient yet) gets none. Each
    param group takes the hyperparameters of the saved group holding its parameters:

        >>> import tempfile, torch, pippy
        >>> from pippy.checkpoint_files import read_records
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> pipe = pippy.pipeline(net, 1, (torch.ones(1, 2),), split_spec={"0": pippy.SplitPoint.END})
        >>> stages = [pipe.build_stage(i, "cpu") for i in range(2)]
        >>> saved = torch.optim.SGD([{"params": st.parameters(), "lr": 0.1 * (st.index + 1)} for st in stages])
        >>> one = pippy.pipeline(net, 1, (torch.ones(1, 2),)).build_stage(0, "cpu")  # the whole model
        >>> layer = [one.submod.get_submodule(str(i)).parameters() for i in (1, 0)]
        >>> opt = torch.optim.SGD([{"params": layer[0]}, {"params": layer[1]}], lr=1.0)
        >>> with tempfile.TemporaryDirectory() as ckpt:
        ...     pippy.checkpoint.save(stages, ckpt, format="dcp", optimizer=saved)
        ...     load_stage_optim([one], opt, ckpt, read_records(ckpt))
        >>> [g["lr"] for g in opt.param_groups]
        [0.2, 0.1]
    """
    saved = [r for r in records if r.optim is not None]
    if not saved:
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} was saved without an optimizer (its stage_<i>.json "
                                "record none); save(..., optimizer=opt) to resume one, or load without optimizer=")
    keys: dict[str, set[str]] = {}
    for r in saved:
        assert r.optim is not None
        if r.optim not in keys:
            keys[r.optim] = saved_keys(os.path.join(path, r.optim), r)
        if f"param_groups_stage{r.index}" not in keys[r.optim]:
            raise KeyError(f"checkpoint {os.fspath(path)!r} is incomplete: stage_{r.index}.json records its optimizer "
                           f"state in {r.optim}/, which lacks it (a later save of other stages overwrote it); save "
                           "every stage again")
    with_state = {sub: _state_prefixes(ks) for sub, ks in keys.items()}
    index = SavedIndex(records)
    template = stage_optimizer_states(stages, optimizer, template=True)  # this split's parameters; DCP fills them
    plan: dict[tuple[str, str], list[dict[str, Any]]] = {}
    per_stage: dict[int, dict[str, Any]] = {}
    for st in stages:
        per_stage[st.index] = {"state": {}}
        for n, entry in template[st.index]["state"].items():
            src = index.source(n, st.index, lambda r, c: r.optim is not None and c in with_state[r.optim])
            if src is not None:  # else the saved run had no state for it (no gradient yet): it gets none
                plan.setdefault((src[0].optim or "", src[1]), []).append(entry)
                per_stage[st.index]["state"][n] = entry
    groups: dict[int, list[dict[str, Any]]] = {}
    for sub in sorted(keys):
        request: dict[str, Any] = {f"param_groups_stage{r.index}": b"" for r in saved if r.optim == sub}
        state = {name: entries[0] for (s, name), entries in plan.items() if s == sub}
        if state:
            request["state"] = state
        load_dcp(request, os.path.join(path, sub))
        groups.update({int(k[len("param_groups_stage"):]): decode_groups(v) for k, v in request.items()
                       if k.startswith("param_groups_stage")})
    for entries in plan.values():  # a second copy on this rank gets its own tensors, not the first one's
        for e in entries[1:]:
            e.update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in entries[0].items()})
    load_stage_optimizer_states(stages, optimizer, per_stage, groups, aliases=index.aliases)

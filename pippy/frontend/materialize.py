"""Deferred initialization: a pipe traced on the meta device; each rank fills only its own stage's tensors.

Build the model under ``torch.device("meta")`` (no memory), trace it with ``pipeline()``, build your
stage: its meta tensors become NaN placeholders on the stage's device. Then fill them, by original
FQN, from a full checkpoint (a ``torch.save`` state_dict, a ``.safetensors`` file or a sharded
``*.safetensors.index.json``; only this stage's tensors are read) or by running the model's own
initialization (``init_fn(module)`` or each module's ``reset_parameters``) on the stage's modules.

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> with torch.device("meta"):
    ...     model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> pipe = pipeline(model, 1, (torch.ones(1, 4),), split_spec={"0": SplitPoint.END})
    >>> stage = pipe.build_stage(1, "cpu")            # NaN placeholders on the CPU
    >>> full = {"1.weight": torch.zeros(2, 4), "1.bias": torch.ones(2)}
    >>> module = materialize_stage(stage, checkpoint=full, model=model)
    >>> module.get_parameter("1.bias").tolist(), pending_tensors(module)
    ([1.0, 1.0], [])
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from pippy.frontend.params import is_lifted_constant, name_groups
from pippy.frontend.pipe import SplitPipe
from pippy.frontend.retarget import retarget_devices

__all__ = ["HoldsModule", "materialize_stage", "pending_tensors", "replace_meta"]

_PENDING = "_pippy_pending"
Checkpoint = str | os.PathLike[str] | Mapping[str, torch.Tensor]


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    params = [(n, t, True) for n, t in module.named_parameters(remove_duplicate=False)]
    bufs = [(n, t, False) for n, t in module.named_buffers(remove_duplicate=False)]
    return params + bufs


def _set(module: nn.Module, fqn: str, value: torch.Tensor, is_param: bool) -> None:
    owner, _, name = fqn.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    if is_param:
        mod._parameters[name] = value  # type: ignore[assignment]
    else:
        mod._buffers[name] = value


def replace_meta(module: nn.Module, device: torch.device | str) -> bool:
    """Swap every meta tensor of ``module`` for a NaN-filled one on ``device`` (ties kept); True if any.

    Graph ops traced on the meta device (``torch.arange(..., device=meta)``) are re-pointed at
    ``device``. The names still to fill are listed by :func:`pending_tensors`.

        >>> with torch.device("meta"):
        ...     lin = torch.nn.Linear(2, 2)
        >>> replace_meta(lin, "cpu"), bool(lin.weight.isnan().all()), pending_tensors(lin)
        (True, True, ['weight', 'bias'])
    """
    device = torch.device(device)
    made: dict[int, torch.Tensor] = {}
    pending: list[str] = []
    for fqn, t, is_param in _named_tensors(module):
        if not t.is_meta:
            continue
        if id(t) not in made:
            fill = float("nan") if t.is_floating_point() or t.is_complex() else 0
            real = torch.full(t.shape, fill, dtype=t.dtype, device=device)
            made[id(t)] = nn.Parameter(real, requires_grad=t.requires_grad) if is_param else real
        _set(module, fqn, made[id(t)], is_param)
        pending.append(fqn)
    graph_changed = retarget_devices(module, ["meta"], device)
    if pending:
        setattr(module, _PENDING, pending)
    return bool(pending) or graph_changed


def pending_tensors(module: nn.Module) -> list[str]:
    """FQNs of tensors created by :func:`replace_meta` and not yet filled (empty when fully materialized)."""
    return list(getattr(module, _PENDING, []))


@runtime_checkable
class HoldsModule(Protocol):
    """What the frontend needs of a runtime stage: its module, its device and its pipe (for tied names).

        >>> isinstance(torch.nn.Linear(1, 1), HoldsModule)
        False
    """

    submod: nn.Module
    device: torch.device
    pipe: SplitPipe


def materialize_stage(
    stage: HoldsModule | nn.Module,
    device: torch.device | str | None = None,
    *,
    checkpoint: Checkpoint | None = None,
    init_fn: Callable[[nn.Module], None] | None = None,
    model: nn.Module | None = None,
) -> nn.Module:
    """Fill a stage's meta-born tensors from ``checkpoint`` and/or by initialization; return its module.

    ``stage`` is a stage module such as ``pipe.get_stage_module(i)`` (moved off meta to
    ``device`` first) or anything that holds one (:class:`HoldsModule`, e.g. a runtime stage: its
    module is filled in place, on its device). Checkpoint keys are the
    original model's FQNs; a tied tensor is found under any of its names. A checkpoint must hold
    every parameter and persistent buffer of the stage (``KeyError`` naming those it lacks, and a
    key prefix such as ``model.`` when that is why). Non-persistent buffers it lacks (such as
    rotary ``inv_freq``), or all tensors when no checkpoint is given, are initialized:
    ``init_fn(module)`` (e.g. Hugging Face's ``model._init_weights``), or else the module's own
    ``reset_parameters()``, or else, for a Hugging Face model, ``model._init_weights`` (which
    computes rotary ``inv_freq``), runs on each original module of ``model`` (the meta model you
    traced) that owns such a tensor, writing into this stage's copies only.

        >>> from pippy import SplitPoint, pipeline
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> stage = pipeline(net, 1, (torch.ones(1, 2),), split_spec={"0": SplitPoint.END}).build_stage(1, "cpu")
        >>> materialize_stage(stage, checkpoint={"model." + k: v for k, v in net.state_dict().items()})
        Traceback (most recent call last):
        KeyError: "stage 1: the checkpoint lacks 2 of the stage's parameters and persistent buffers: ['1.weight', '1.bias'] ... under the prefix 'model.' ...

        >>> with torch.device("meta"):
        ...     lin = torch.nn.Linear(3, 2)
        >>> _ = torch.manual_seed(0)
        >>> filled = materialize_stage(copy.deepcopy(lin), model=lin)   # nn.Linear.reset_parameters
        >>> filled.weight.device.type, bool(filled.weight.isnan().any())
        ('cpu', False)
    """
    holder = stage if isinstance(stage, HoldsModule) else None
    module: nn.Module = holder.submod if holder is not None else stage  # type: ignore[assignment]
    if device is None:
        device = holder.device if holder is not None else "cpu"
    replace_meta(module, device)
    pending = pending_tensors(module)
    todo = set(pending) or ({n for n, _, _ in _named_tensors(module)} if init_fn is not None else set())
    if checkpoint is not None:
        names = pending or [n for n, _, _ in _named_tensors(module)]  # reload everything if nothing is pending
        reader = _open(checkpoint)
        done = _load(module, reader, names, _aliases(holder.pipe if holder is not None else None, model))
        lacking = [n for n in names if n not in done and _is_state(module, n, model)]
        if lacking:
            index = getattr(holder, "index", None)
            where = f"stage {index}" if isinstance(index, int) else "the stage"
            raise KeyError(_lacking_message(where, lacking, reader.keys))
        todo -= done
    if todo:
        _initialize(module, sorted(todo), init_fn, model)
    setattr(module, _PENDING, [])
    return module


def _aliases(pipe: SplitPipe | None, model: nn.Module | None) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for names in name_groups(pipe, model):
        for n in names:
            groups.setdefault(n, []).extend(names)
    return groups


def _is_state(module: nn.Module, fqn: str, model: nn.Module | None) -> bool:
    """Whether ``fqn`` belongs in a checkpoint: a parameter or a persistent buffer (not export's lifted constants)."""
    if is_lifted_constant(fqn):
        return False
    owner, _, name = fqn.rpartition(".")
    mods = [module.get_submodule(owner) if owner else module]
    if model is not None:
        try:
            mods.append(model.get_submodule(owner) if owner else model)
        except AttributeError:
            pass
    if name in mods[0]._parameters:
        return True
    return not any(name in m._non_persistent_buffers_set for m in mods)


def _lacking_message(where: str, lacking: list[str], keys: set[str]) -> str:
    shown = f"{lacking[:6]}{' ...' if len(lacking) > 6 else ''}"
    hint = ""
    first = lacking[0]
    extra = sorted({k[: -len(first)] for k in keys if k.endswith("." + first)})
    p = next((p for p in extra if all(p + n in keys for n in lacking)), None)
    if p is not None:
        hint = (f"; the checkpoint has them under the prefix {p!r} (e.g. {p + first!r}): strip it, e.g. "
                f"{{k.removeprefix({p!r}): v for k, v in state_dict.items()}}")
    else:
        parts = first.split(".")
        inner = next((".".join(parts[i:]) for i in range(1, len(parts)) if ".".join(parts[i:]) in keys), None)
        if inner is not None:
            p = first[: len(first) - len(inner)]
            hint = f"; the checkpoint's keys lack the prefix {p!r} (it has {inner!r} for {first!r}): add it"
    return (f"{where}: the checkpoint lacks {len(lacking)} of the stage's parameters and persistent buffers: {shown} "
            f"(it holds {len(keys)} keys, e.g. {sorted(keys)[:3]}){hint}. Expected the original model's FQNs; only "
            "non-persistent buffers are initialized when a checkpoint lacks them")


def _load(module: nn.Module, reader: _Reader, names: Iterable[str], aliases: dict[str, list[str]]) -> set[str]:
    """Copy checkpoint tensors into ``module`` by FQN (or a tied alias); return the names filled."""
    tensors = {n: t for n, t, _ in _named_tensors(module)}
    done: set[str] = set()
    with torch.no_grad():
        for fqn in names:
            key = next((k for k in [fqn, *aliases.get(fqn, [])] if k in reader.keys), None)
            if key is None:
                continue
            src, dst = reader.get(key), tensors[fqn]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"checkpoint tensor {key!r} has shape {list(src.shape)} but the stage's {fqn!r} is "
                    f"{list(dst.shape)}; is the checkpoint from the same model config?"
                )
            dst.copy_(src)
            done.add(fqn)
    return done


class _Reader:
    """Lazy access to a checkpoint's tensors by key (only the requested ones are read)."""

    def __init__(self, keys: set[str], get: Callable[[str], torch.Tensor]) -> None:
        self.keys = keys
        self.get = get


def _open(checkpoint: Checkpoint) -> _Reader:
    if isinstance(checkpoint, Mapping):
        sd = checkpoint
        return _Reader(set(sd), lambda k: sd[k])
    path = os.fspath(checkpoint)
    if path.endswith(".safetensors") or path.endswith(".index.json"):
        from safetensors import safe_open

        if path.endswith(".index.json"):
            with open(path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            root = os.path.dirname(path)
            files = {k: os.path.join(root, v) for k, v in weight_map.items()}
        else:
            with safe_open(path, framework="pt", device="cpu") as f:
                files = dict.fromkeys(f.keys(), path)
        handles: dict[str, Any] = {}

        def get(key: str) -> torch.Tensor:
            fname = files[key]
            if fname not in handles:
                handles[fname] = safe_open(fname, framework="pt", device="cpu")
            return handles[fname].get_tensor(key)

        return _Reader(set(files), get)
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return _Reader(set(sd), lambda k: sd[k])


def _initialize(
    module: nn.Module, names: list[str], init_fn: Callable[[nn.Module], None] | None, model: nn.Module | None
) -> None:
    if model is None:
        raise ValueError(
            f"{len(names)} stage tensors still need values (e.g. {names[:3]}): pass a checkpoint that holds them, "
            "or model=<the model you traced> so its modules' init_fn / reset_parameters can initialize them"
        )
    by_owner: dict[str, list[str]] = {}
    for fqn in names:
        owner, _, field = fqn.rpartition(".")
        by_owner.setdefault(owner, []).append(field)
    tensors = {n: t for n, t, _ in _named_tensors(module)}
    with torch.no_grad():
        for owner, fields in by_owner.items():
            orig = model.get_submodule(owner) if owner else model
            view = copy.copy(orig)  # same class and config, but this stage's tensors
            view.__dict__["_parameters"] = dict(orig._parameters)
            view.__dict__["_buffers"] = dict(orig._buffers)
            for f in fields:
                t = tensors[f"{owner}.{f}" if owner else f]
                if f in orig._parameters:
                    view._parameters[f] = t  # type: ignore[assignment]
                else:
                    view._buffers[f] = t
            own_init = getattr(model, "_init_weights", None)  # a Hugging Face model's initializer
            if init_fn is not None:
                init_fn(view)
            elif hasattr(view, "reset_parameters"):
                view.reset_parameters()
            elif callable(own_init):
                own_init(view)
            else:
                raise ValueError(
                    f"{type(orig).__name__} at {owner!r} has no reset_parameters(); pass init_fn=... "
                    "(e.g. model._init_weights for Hugging Face models) or a checkpoint holding "
                    f"{', '.join(fields)}"
                )
    left = [n for n in names if _has_nan(tensors[n])]
    if left:
        raise ValueError(f"initialization left {left[:5]} unset (still NaN); extend init_fn to cover them")


def _has_nan(t: torch.Tensor) -> bool:
    return bool(t.is_floating_point() and t.numel() > 0 and torch.isnan(t).any())

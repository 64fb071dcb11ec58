"""Checks of what users pass in (stages, loss_fn, devices) and a guard against optimizers of the traced model.

The optimizer guard: ``build_stage`` gives each stage its own copy of its parameters, so an
optimizer made from the traced model's ``parameters()`` would step tensors no pipeline step ever
gives a gradient. Once a stage is built, an optimizer about to step that holds parameters of the
traced model and no gradient at all raises instead of silently doing nothing.

    >>> import torch
    >>> from pippy import pipeline
    >>> net = torch.nn.Linear(2, 1)
    >>> pipe = pipeline(net, 1, (torch.ones(1, 2),))
    >>> stale = torch.optim.SGD(net.parameters(), lr=0.1)      # made from the traced model
    >>> stage = pipe.build_stage(0, "cpu")
    >>> stale.step()
    Traceback (most recent call last):
    ...
    pippy.runtime.stage.StageError: optimizer SGD holds 2 parameters of Linear, the model pippy traced, ...
    >>> torch.optim.SGD(stage.parameters(), lr=0.1).step()       # the stage's own copies: fine
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from pippy.frontend.cudadevice import resolve_cuda
from pippy.frontend.pipe import SplitPipe
from pippy.runtime.comm import backend_name
from pippy.runtime.stage import Stage, StageError

__all__ = ["check_device", "check_loss_fn", "check_placement", "check_stages", "rank_or_none", "use_cuda_device",
           "watch_traced_parameters"]

# parameter of a traced model whose stages were built -> (model name, FQN, stage or None)
_TRACED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_PIPES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # pipes whose parameters are in _TRACED
# optimizer -> ((generation, number of parameters), holds traced parameters); rechecked when either changes
_VERDICT: WeakIdKeyDictionary = WeakIdKeyDictionary()
_generation = 0
_hook: Any = None


def rank_or_none(group: Any = None) -> int | None:
    """This process's rank in ``group`` (default: the world) when torch.distributed is initialized, else None.

        >>> rank_or_none() is None or isinstance(rank_or_none(), int)
        True
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return int(dist.get_rank(group))


def _on_rank(rank: int | None) -> str:
    return "" if rank is None else f" on rank {rank}"


# ---------------------------------------------------------------------------------------- stages
def check_stages(schedule: str, stages: Any, rank: int | None = None) -> list[Stage]:
    """The list of stages a schedule was given, or a clear error for anything else.

    Accepts one stage or a sequence of stages, all built from the same pipe, each once. A module
    (``pipe.get_stage_module(i)``, the model) or the pipe itself is refused with the fix.

        >>> import torch
        >>> from pippy import pipeline
        >>> pipe = pipeline(torch.nn.Linear(2, 1), 1, (torch.ones(1, 2),))
        >>> check_stages("Schedule1F1B", pipe.get_stage_module(0))
        Traceback (most recent call last):
        ...
        TypeError: Schedule1F1B: expected the runtime stage(s) of this rank, got a GraphModule ...
    """
    where = f"{schedule}{_on_rank(rank)}"
    if isinstance(stages, Stage):
        return [stages]
    if isinstance(stages, nn.Module | SplitPipe | str) or not isinstance(stages, Iterable):
        raise TypeError(f"{where}: expected the runtime stage(s) of this rank, got {_what(stages)}. {_STAGE_FIX}")
    out = list(stages)
    if not out:
        raise StageError(f"{where}: got no stage. Expected this rank's stage(s). {_STAGE_FIX}")
    for k, st in enumerate(out):
        if not isinstance(st, Stage):
            raise TypeError(f"{where}: stages[{k}] is {_what(st)}, expected a runtime stage. {_STAGE_FIX}")
    pipe = out[0].pipe
    for st in out[1:]:
        # hand-cut stages each start with a chain of their own; the schedule links them into one
        if st.pipe is not pipe and not (getattr(pipe, "manual", False) and getattr(st.pipe, "manual", False)):
            raise StageError(
                f"{where}: stages {out[0].index} and {st.index} were built from two different pipes (two "
                f"pipeline() calls: {pipe.model_name} in {pipe.num_stages} stages and {st.pipe.model_name} in "
                f"{st.pipe.num_stages} stages). Expected every stage of a schedule to come from one pipe: build them "
                "all with the same pipe's build_stage (each pipeline() call traces anew; its edges need not match "
                "another trace's)"
            )
    seen: set[int] = set()
    for st in out:
        if st.index in seen:
            raise StageError(
                f"{where}: stage {st.index} was given twice; expected each stage this rank holds once "
                f"(got stages {[s.index for s in out]})"
            )
        seen.add(st.index)
    return out


_STAGE_FIX = (
    "Pass what pipe.build_stage(i, device) returns (a list of them for multi-stage schedules), not "
    "pipe.get_stage_module(i), the model or the pipe."
)


def check_placement(name: str, rank: int, stages: Iterable[Stage], num_stages: int, sch: Any, group: Any = None) -> None:
    """Raise unless schedule ``sch`` (a :class:`pippy.schedules.Schedule`) has ``num_stages`` stages and places on
    ``rank`` (of ``group``) exactly the ``stages`` given to it.

        >>> from pippy.schedules import gpipe
        >>> check_placement("gpipe", 0, [], 2, gpipe(2, 2))
        Traceback (most recent call last):
        ...
        pippy.runtime.stage.StageError: gpipe: rank 0 was given stages [] but the schedule places stages [0] on it ...
    """
    hint = (f"Build the pipe with {sch.num_stages} stages for {sch.num_ranks} ranks and pass each rank the stages "
            "the schedule places on it (world size must equal the number of ranks the schedule uses).")
    if sch.num_stages != num_stages:
        raise StageError(f"{name}: the schedule has {sch.num_stages} stages but the pipe has {num_stages}; {hint}")
    want = sch.stages_of(rank)
    have = sorted(st.index for st in stages)
    if want != have:
        raise StageError(
            f"{name}: rank {rank}{_global_rank(group)} was given stages {have} but the schedule places stages {want} "
            f"on it (placement stage->rank {list(sch.stage_to_rank)}). {hint}"
        )


def _global_rank(group: Any) -> str:
    """`` of the pipeline's group (global rank g; ...)`` when ``group`` numbers its ranks otherwise than the world."""
    if group is None or not dist.is_initialized() or group is dist.GroupMember.WORLD:
        return ""
    ranks = dist.get_process_group_ranks(group)
    if ranks == list(range(dist.get_world_size())):
        return ""
    return (f" of the pipeline's group (global rank {dist.get_rank()}; the group's ranks are the global ranks {ranks} "
            "in that order, and a stage index goes with a rank's place in it)")


def _what(x: Any) -> str:
    if isinstance(x, SplitPipe):
        return f"the pipe itself ({x.model_name}, {x.num_stages} stages)"
    if isinstance(x, fx.GraphModule):
        return "a GraphModule (pipe.get_stage_module(i)?)"
    if isinstance(x, nn.Module):
        return f"{type(x).__name__} (a module: the model?)"
    return type(x).__name__


# ---------------------------------------------------------------------------------------- loss_fn
def check_loss_fn(
    schedule: str, loss_fn: Callable[..., Any] | None, last_stage: int, rank: int | None = None
) -> None:
    """Refuse a ``loss_fn`` that cannot be called as ``loss_fn(output, target)``.

    Only a signature Python can read is checked (a builtin or a module's ``*args`` passes).

        >>> check_loss_fn("ScheduleGPipe", lambda out, target: (out - target).pow(2).mean(), 1)
        >>> check_loss_fn("ScheduleGPipe", lambda out: out.sum(), 1)
        Traceback (most recent call last):
        ...
        TypeError: ScheduleGPipe: loss_fn <lambda>(out) cannot be called as loss_fn(output, target): ...
    """
    if loss_fn is None:
        return
    if not callable(loss_fn):
        raise TypeError(
            f"{schedule}{_on_rank(rank)}: loss_fn must be callable as loss_fn(output, target), got "
            f"{type(loss_fn).__name__}; pass e.g. torch.nn.functional.cross_entropy, or loss_fn=None when the model "
            "returns its own loss"
        )
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # builtins and C functions: nothing to read
        return
    required_kw = {n: object() for n, p in sig.parameters.items()  # fed by step(loss_kwargs=...)
                   if p.kind is p.KEYWORD_ONLY and p.default is p.empty}
    try:
        sig.bind(object(), object(), **required_kw)
    except TypeError as exc:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise TypeError(
            f"{schedule}{_on_rank(rank)}: loss_fn {name}{sig} cannot be called as loss_fn(output, target): {exc}. "
            f"The rank holding the last stage (stage {last_stage}) calls loss_fn(output, target) for every "
            "micro-batch, with the model's output and that micro-batch's slice of step(target=...). How to fix: "
            "take two positional arguments, def loss_fn(output, target): ...; for a model that computes its own "
            "loss, pass loss_fn=None and make it return a scalar or an output with a 'loss' field"
        ) from None


# ---------------------------------------------------------------------------------------- devices
def check_device(pipe: SplitPipe, index: int, device: torch.device | str, group: Any = None) -> torch.device:
    """The device stage ``index`` is built on, or a clear error when no pipeline can run there.

    Refused: ``meta`` (no data), CUDA where none (or not that many) exists, a non-CUDA device
    under an NCCL group, and a CUDA device under a group whose only backend is gloo. A CUDA stage
    is resolved and made current by :func:`use_cuda_device`.

        >>> import torch
        >>> from pippy import pipeline
        >>> pipe = pipeline(torch.nn.Linear(2, 1), 1, (torch.ones(1, 2),))
        >>> check_device(pipe, 0, "cpu")
        device(type='cpu')
        >>> check_device(pipe, 0, "meta")
        Traceback (most recent call last):
        ...
        pippy.runtime.stage.StageError: build_stage(0, 'meta'): a stage cannot run on the meta device ...
    """
    call = f"build_stage({index}, {str(device)!r}){_on_rank(rank_or_none(group))}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{call}: {device!r} is not a torch device ({exc}). Pass 'cpu', 'cuda', or "
            "torch.device('cuda', local_rank)"
        ) from None
    if dev.type == "meta":
        raise StageError(
            f"{call}: a stage cannot run on the meta device (it holds no data). Expected the device this rank "
            "computes on: 'cpu' under gloo, torch.device('cuda', local_rank) under nccl. A model traced on meta is "
            "filled on the real device: build_stage(i, device, checkpoint=... or init_fn=...)"
        )
    if dist.is_available() and dist.is_initialized():
        backend = backend_name(group, dev)
        if "nccl" in backend and dev.type != "cuda":
            raise StageError(
                f"{call}: the process group uses {backend}, which only moves CUDA tensors, but the stage is on "
                f"{dev}. Build it on torch.device('cuda', local_rank), or use a gloo group for CPU stages"
            )
    return use_cuda_device(dev, call, group) if dev.type == "cuda" else dev


def use_cuda_device(device: torch.device, call: str, group: Any = None) -> torch.device:
    """Check CUDA stage ``device`` (``call`` names the stage in errors), give a bare ``cuda`` this process's index
    (:func:`~pippy.frontend.cudadevice.local_cuda_index`) and make it the current CUDA device.

    ``torch.cuda.set_device`` is called when the current device differs: NCCL's barriers and object
    collectives (torch's, and pippy's trace gathers and checkpoint saves) run on the current device, and a
    process that never set it would meet every other rank of its host on ``cuda:0``. Refused: no CUDA, an
    index past the device count, and a group that moves CUDA tensors with gloo (pippy's sends fail there).

        >>> use_cuda_device(torch.device("cuda", 9999), "build_stage(0, 'cuda:9999')")
        Traceback (most recent call last):
        ...
        pippy.runtime.stage.StageError: build_stage(0, 'cuda:9999'): ...
    """
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise StageError(
            f"{call}: this machine has no CUDA device (torch.cuda.is_available() is False). "
            "Build the stage on 'cpu' (with a gloo process group), or run where CUDA is available"
        )
    if device.index is not None and device.index >= count:
        raise StageError(
            f"{call}: cuda:{device.index} does not exist; this machine has {count} CUDA device(s) (0..{count - 1}). "
            "Use torch.device('cuda', local_rank) with LOCAL_RANK from torchrun"
        )
    if dist.is_available() and dist.is_initialized():
        backend = backend_name(group, device)
        if "gloo" in backend:
            raise StageError(
                f"{call}: the process group moves CUDA tensors with {backend}, which cannot send a CUDA stage's "
                "activations the way pippy does (the first send fails with 'peer probably exited'). Expected an NCCL "
                "group for CUDA stages: dist.init_process_group(backend='nccl'), or backend='cpu:gloo,cuda:nccl' "
                "for CPU and CUDA tensors in one group; or build the stage on 'cpu'"
            )
    device = resolve_cuda(device)
    if torch.cuda.current_device() != device.index:
        torch.cuda.set_device(device)
    return device


# ---------------------------------------------------------------------------------------- optimizers
def watch_traced_parameters(pipe: SplitPipe) -> None:
    """Remember the traced model's parameters once a stage of ``pipe`` is built (see the module docstring).

    Installs the global optimizer step pre-hook on first use; an optimizer holding none of these
    parameters costs one lookup per step.

        >>> import torch
        >>> from pippy import pipeline
        >>> net = torch.nn.Linear(2, 1)
        >>> watch_traced_parameters(pipeline(net, 1, (torch.ones(1, 2),)))
        >>> net.weight in _TRACED
        True
    """
    global _generation, _hook
    if pipe in _PIPES:
        return
    _PIPES[pipe] = True
    for info in pipe.stage_infos:
        for name, prm in info.module.named_parameters(remove_duplicate=False):
            if prm not in _TRACED:
                _TRACED[prm] = (pipe.model_name, name, info.index)
    source = pipe.source_model()
    if source is not None:
        for name, prm in source.named_parameters():
            if prm not in _TRACED:
                _TRACED[prm] = (pipe.model_name, name, None)
    _generation += 1
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_before_step)


def _before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    key = (_generation, sum(len(group["params"]) for group in opt.param_groups))
    cached = _VERDICT.get(opt)
    if cached is not None and cached[0] == key and not cached[1]:
        return  # holds no parameter of a traced model: the common case, one lookup per step
    params = [p for group in opt.param_groups for p in group["params"]]
    held = [p for p in params if p in _TRACED]
    _VERDICT[opt] = (key, bool(held))
    if not held or any(p.grad is not None for p in params):
        return
    model, name, stage = _TRACED[held[0]]
    in_stage = f" (stage {stage})" if stage is not None else ""
    raise StageError(
        f"optimizer {type(opt).__name__} holds {len(held)} parameters of {model}, the model pippy traced, e.g. "
        f"{name}{in_stage}{_on_rank(rank_or_none())}, and none of its parameters has a gradient. build_stage gives "
        "each stage its own copy of its parameters, and the pipeline's backward fills the copies' .grad, so this "
        "optimizer would never update anything. How to fix: create the optimizer from stage.parameters() after "
        "build_stage, e.g. torch.optim.AdamW(stage.parameters()) (several stages on this rank: "
        "itertools.chain(*(s.parameters() for s in stages)))"
    )


def is_fsdp(module: nn.Module) -> bool:
    """True for a module wrapped by FSDP2's ``fully_shard`` (it then owns its gradient reduction).

        >>> is_fsdp(torch.nn.Linear(2, 2))
        False
    """
    return callable(getattr(module, "set_requires_gradient_sync", None)) and callable(getattr(module, "unshard", None))


def drop_unreduced_grads(module: nn.Module) -> None:
    """After a failed step: FSDP2 reduces in the next backward again and forgets gradients it had not reduced.

    With sync off (every backward of a step but the last), FSDP2 accumulates unsharded gradients
    in its own buffers, which ``zero_grad()`` does not clear; a later step would reduce them.
    Reads FSDP2's per-parameter state (torch internals, guarded: absent attributes are skipped).

        >>> drop_unreduced_grads(torch.nn.Linear(2, 2))  # not sharded: nothing to do
    """
    if not is_fsdp(module):
        return
    module.set_requires_gradient_sync(True)
    for sub in module.modules():
        state = getattr(sub, "_get_fsdp_state", None)
        group = getattr(state(), "_fsdp_param_group", None) if callable(state) else None
        for fp in getattr(group, "fsdp_params", []) or []:
            if hasattr(fp, "unsharded_accumulated_grad"):
                fp.unsharded_accumulated_grad = None

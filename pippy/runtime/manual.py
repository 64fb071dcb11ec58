"""Hand-cut stages: a user's own module for one stage of a chain, described by example inputs, no tracing.

Stage ``i`` reads every output of stage ``i - 1`` in order, as PiPPy's ``ManualPipelineStage``
did. Each rank knows only its own stages; when a schedule is built, the ranks swap their
stages' input/output shapes (through the process group's store, with a bounded wait) and the
chain is checked: stage ``i``'s outputs must be stage ``i + 1``'s inputs.

    >>> import torch
    >>> a, b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
    >>> stages = [ManualStage(a, 0, 2, "cpu", 2, torch.ones(3, 4)), ManualStage(b, 1, 2, "cpu", 2, torch.ones(3, 8))]
    >>> link_stages(stages)
    >>> [s.describe_edges() for s in stages]
    ['stage 0: in [float32[3, 4]] -> out [float32[3, 8]]', 'stage 1: in [float32[3, 8]] -> out [float32[3, 2]]']
    >>> stages[1].submod is b
    True
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from pippy.frontend.cudadevice import on_collective_device
from pippy.frontend.pipe import SplitPipe
from pippy.frontend.precision import autocast_state
from pippy.frontend.split import USER, InputRef, StageInfo, ValueMeta
from pippy.runtime.comm import PipeTimeoutError
from pippy.runtime.guards import rank_or_none, use_cuda_device
from pippy.runtime.stage import PipeliningShapeError, Stage
from pippy.runtime.transport import default_timeout
from pippy.runtime.watch import group_store

__all__ = ["ManualStage", "link_stages", "module_stage", "needs_link", "stage_metas"]

_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
                                torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)}
_EXCHANGES: dict[tuple[int, ...], int] = {}


def _tensors(value: Any, what: str, index: int) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    raise TypeError(
        f"ManualPipelineStage {index}: {what} must be a tensor or a non-empty list/tuple of tensors (one micro-batch), "
        f"got {type(value).__name__}{'' if not isinstance(value, list | tuple) else ' of ' + str([type(v).__name__ for v in value])}"
    )


def _metas(ts: Sequence[torch.Tensor], grad: bool) -> list[ValueMeta]:
    return [ValueMeta(tuple(t.shape), t.dtype, grad and (t.dtype.is_floating_point or t.dtype.is_complex)) for t in ts]


class _Chain(SplitPipe):
    """The pipe of a chain of hand-cut stages: this rank's stages are real, the others known by their shapes."""

    manual = True
    pending = False  # True until stages built without input_args learn their shapes (runtime/infershapes.py)
    learned = False  # the shapes were learned at a first step, not given as input_args
    shaped_under: tuple[str, str] | None = None  # the torch.autocast its dtypes were learned under (None: none)


def _infos(index: int, num_stages: int, module: nn.Module, ins: list[ValueMeta], outs: list[ValueMeta]) -> StageInfo:
    src = USER if index == 0 else index - 1
    last = index == num_stages - 1
    return StageInfo(
        index=index, module=module, inputs=[InputRef(src, k) for k in range(len(ins))], input_meta=ins,  # type: ignore[arg-type]
        input_names=[f"input_{k}" for k in range(len(ins))], outputs=outs,
        output_names=[f"output_{j}" for j in range(len(outs))],
        consumers=[[] if last else [(index + 1, j)] for j in range(len(outs))],
    )


def _chain(infos: list[StageInfo], num_chunks: int, name: str) -> _Chain:
    first, last = infos[0], infos[-1]
    example = [torch.empty(m.shape or (), dtype=m.dtype, device="meta") for m in first.input_meta]
    in_spec = pytree.tree_flatten((tuple(example), {}))[1]
    out_spec = pytree.tree_flatten(last.outputs[0] if len(last.outputs) == 1 else tuple(last.outputs))[1]
    chain = _Chain(infos, num_chunks=num_chunks, in_spec=in_spec, out_spec=out_spec, example_leaves=example,
                   shared=[], model_name=name)
    chain.shaped_under = autocast_state()
    return chain


class ManualStage(Stage):
    """Stage ``stage_index`` of ``num_stages``: ``submodule`` as given (moved to ``device``, not copied).

    ``input_args`` is one micro-batch of this stage's inputs (tensor or list; only shapes and
    dtypes are read); ``output_args`` its outputs, else found by running ``submodule`` once.
    """

    def __init__(self, submodule: nn.Module, stage_index: int, num_stages: int, device: torch.device | str,
                 num_microbatches: int, input_args: Any, output_args: Any = None, group: Any = None) -> None:
        if not isinstance(submodule, nn.Module):
            raise TypeError(f"ManualPipelineStage {stage_index}: submodule must be an nn.Module, got {type(submodule).__name__}")
        if not 0 <= stage_index < num_stages:
            raise ValueError(f"ManualPipelineStage: stage_index {stage_index} is not in 0..{num_stages - 1} (num_stages={num_stages})")
        dev = torch.device(device)
        if dev.type == "cuda":  # checked, indexed, and made this process's current device (as build_stage does)
            rank = rank_or_none(group)
            where = f"ManualPipelineStage(stage {stage_index}, {str(device)!r}){'' if rank is None else f' on rank {rank}'}"
            dev = use_cuda_device(dev, where, group)
        on_meta = any(t.is_meta for t in [*submodule.parameters(), *submodule.buffers()])
        if not on_meta:  # a module built on the meta device stays there until the user's to_empty() + init
            submodule.to(dev)
        if input_args is None:  # shapes learned in the first step (runtime/infershapes.py): stand-ins until then
            guess = [_infos(s, num_stages, submodule if s == stage_index else nn.Module(),
                            [ValueMeta((1, 1), torch.float32, s > 0)], [ValueMeta((1, 1), torch.float32, True)])
                     for s in range(num_stages)]
            chain = _chain(guess, num_microbatches, type(submodule).__name__)
            chain.pending = True
            super().__init__(chain, stage_index, dev, group, module=submodule)
        else:
            ins = [t.to(dev) if t.device.type != "meta" else torch.empty_like(t, device=dev)
                   for t in _tensors(input_args, "input_args", stage_index)]
            if output_args is None:  # its output shapes, from one forward (on meta tensors for a meta module)
                with torch.no_grad():
                    out = submodule(*[torch.empty_like(t, device="meta") for t in ins] if on_meta else ins)
                outs = _tensors(out, "the output of submodule(*input_args)", stage_index)
            else:
                outs = _tensors(output_args, "output_args", stage_index)
            infos = [_infos(stage_index, num_stages, submodule, _metas(ins, stage_index > 0), _metas(outs, True))]
            placeholders = [_infos(s, num_stages, nn.Module(), [], []) for s in range(num_stages) if s != stage_index]
            infos = sorted(infos + placeholders, key=lambda i: i.index)
            super().__init__(_chain(infos, num_microbatches, type(submodule).__name__), stage_index, dev, group,
                             module=submodule)
        self.num_microbatches = num_microbatches

    @property
    def inputs_meta(self) -> list[ValueMeta]:
        """This stage's input shapes and dtypes (PiPPy's and PyTorch pipelining's name)."""
        return list(self.info.input_meta)

    @property
    def outputs_meta(self) -> list[ValueMeta]:
        """This stage's output shapes and dtypes."""
        return list(self.info.outputs)

    def describe_edges(self) -> str:
        """``stage i: in [...] -> out [...]`` for messages and checks."""
        ins = ", ".join(m.describe() for m in self.info.input_meta)
        outs = ", ".join(m.describe() for m in self.info.outputs)
        return f"stage {self.index}: in [{ins}] -> out [{outs}]"


def needs_link(stages: Sequence[Stage]) -> bool:
    """True when these stages are hand-cut and their chain is not known on this rank yet."""
    return any(isinstance(s, ManualStage) for s in stages) and any(
        not info.outputs and not info.inputs for info in stages[0].pipe.stage_infos
    )


def stage_metas(stages: Sequence[Stage]) -> dict[str, Any]:
    """JSON-able shapes of this rank's hand-cut stages, keyed by stage index."""
    return {str(s.index): [[_enc(m) for m in s.info.input_meta], [_enc(m) for m in s.info.outputs]] for s in stages}


def _enc(m: ValueMeta) -> list[Any]:
    return [list(m.shape or ()), str(m.dtype), m.requires_grad]


def _mismatch_of(got: list[tuple[Any, Any]], want: list[tuple[Any, Any]]) -> str:
    """What differs between two lists of ``(shape, dtype)``, in PyTorch pipelining's words.

        >>> _mismatch_of([((2, 8), torch.float32)], [((2, 8), torch.int64)])
        'dtype mismatch'
    """
    shapes = len(got) != len(want) or any(g[0] != w[0] for g, w in zip(got, want))
    dtypes = any(g[1] != w[1] for g, w in zip(got, want))
    return " and ".join(k for k, bad in (("shape mismatch", shapes), ("dtype mismatch", dtypes)) if bad) or "mismatch"


def _dec(x: list[Any]) -> ValueMeta:
    return ValueMeta(tuple(x[0]), _DTYPES[x[1]], bool(x[2]))


def link_stages(stages: Sequence[Stage], others: dict[str, Any] | None = None) -> None:
    """Give ``stages`` (this rank's hand-cut stages) one pipe describing the whole chain, and check the chain.

    ``others`` maps stage index (str) to ``[input metas, output metas]`` of stages held elsewhere
    (see :func:`exchange`); without it, ``stages`` must be every stage. Raises ``ValueError``
    naming the two stages whose shapes do not meet.
    """
    known = {**(others or {}), **stage_metas(stages)}
    n = stages[0].pipe.num_stages
    missing = [s for s in range(n) if str(s) not in known]
    if missing:
        raise ValueError(f"ManualPipelineStage: no rank holds stage(s) {missing} of {n}; build every stage 0..{n - 1} on some rank")
    mine = {s.index: s for s in stages}
    infos = []
    for s in range(n):
        ins, outs = ([_dec(m) for m in part] for part in known[str(s)])
        module = mine[s].submod if s in mine else nn.Module()
        infos.append(_infos(s, n, module, ins, outs))
    for s in range(n - 1):
        got = [(m.shape, m.dtype) for m in infos[s].outputs]
        want = [(m.shape, m.dtype) for m in infos[s + 1].input_meta]
        if got != want:
            raise PipeliningShapeError(
                f"ManualPipelineStage: stage {s} outputs [{', '.join(m.describe() for m in infos[s].outputs)}] but "
                f"stage {s + 1} expects inputs [{', '.join(m.describe() for m in infos[s + 1].input_meta)}] "
                f"({_mismatch_of(got, want)}). Each stage "
                f"reads all outputs of the one before, in order: fix stage {s}'s module or stage {s + 1}'s input_args "
                "(one micro-batch each, same shapes and dtypes)."
            )
    chain = _chain(infos, stages[0].pipe.num_chunks, stages[0].pipe.model_name)
    chain.args_chunk_spec = stages[0].pipe.args_chunk_spec  # a schedule's args_chunk_spec= (see userschedule._torch_options)
    chain.kwargs_chunk_spec = stages[0].pipe.kwargs_chunk_spec
    for st in stages:
        st.pipe = chain
        st.info = chain.stage_infos[st.index]


def exchange(stages: Sequence[Stage], group: Any, timeout: float | None = None) -> dict[str, Any]:
    """Swap the shapes of every rank's hand-cut stages through the group's store; a bounded wait names who is missing."""
    group = group if group is not None else dist.group.WORLD
    ranks = tuple(dist.get_process_group_ranks(group))
    me = dist.get_rank(group)
    mine = stage_metas(stages)
    store = group_store(group)
    if store is None:  # no store to read: a collective, bounded by the group's own timeout
        gathered: list[Any] = [None] * len(ranks)
        with on_collective_device(group):  # NCCL gathers objects on the current CUDA device
            dist.all_gather_object(gathered, mine, group=group)
        return {k: v for d in gathered for k, v in d.items()}
    n = _EXCHANGES[ranks] = _EXCHANGES.get(ranks, 0) + 1
    prefix = f"pippy/{'-'.join(map(str, ranks))}/manual/{n}"
    store.set(f"{prefix}/{me}", json.dumps(mine))
    wait = default_timeout() if timeout is None else timeout
    keys = [f"{prefix}/{r}" for r in range(len(ranks)) if r != me]
    try:
        store.wait(keys, datetime.timedelta(seconds=wait))
    except Exception:
        absent = [r for r in range(len(ranks)) if r != me and not store.check([f"{prefix}/{r}"])]
        raise PipeTimeoutError(
            f"rank {me}: waited {wait:.0f}s for the stage shapes of rank(s) {absent} while building a schedule of "
            "ManualPipelineStage(s). Expected every rank of the group to build its stages and its schedule (in "
            "the same order); start the missing ranks or build the schedule there too."
        ) from None
    out: dict[str, Any] = {}
    for k in keys:
        out.update(json.loads(store.get(k).decode()))
    return {**out, **mine}


def module_stage(submodule: nn.Module, stage_index: int, num_stages: int, device: torch.device | str = "cpu",
                 input_args: Any = None, output_args: Any = None, group: Any = None, dw_builder: Any = None) -> ManualStage:
    """A stage from PyTorch pipelining's ``PipelineStage(submodule, stage_index, num_stages, device, input_args=,
    output_args=, group=)`` form: a :class:`ManualStage` of the user's own module. Without ``input_args`` the
    stages learn their shapes in the first step (:mod:`pippy.runtime.infershapes`).

        >>> stage = module_stage(torch.nn.Linear(3, 5), 0, 1, "cpu", input_args=torch.ones(2, 3))
        >>> stage.describe_edges()
        'stage 0: in [float32[2, 3]] -> out [float32[2, 5]]'
    """
    if dw_builder is not None:
        raise TypeError(
            f"PipelineStage(module, {stage_index}, {num_stages}, ...): dw_builder is not supported; pippy computes "
            "weight gradients itself under split-backward schedules. Leave it out"
        )
    return ManualStage(submodule, stage_index, num_stages, device, 1, input_args, output_args, group)


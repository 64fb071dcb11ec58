"""Hand-cut stages built without ``input_args`` learn their shapes in the first step, one stage after another.

``PipelineStage(module, stage_index, num_stages, device)`` with no example input (PyTorch
pipelining's form) cannot know its inputs' shapes until a batch arrives. At a schedule's first
step the rank holding stage 0 runs it on the first micro-batch (no autograd, under the step's own
autocast), posts the output shapes and dtypes through the process group's store, and each next
stage does the same on zeros of those shapes: every wait is bounded and names the stage it waited
for. The chain is then linked as if the shapes had been given (see :func:`pippy.runtime.manual.link_stages`).
Each rank's keyword arguments to ``step()`` are its stages' keyword inputs, as there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from pippy.frontend.precision import autocast_state
from pippy.microbatch import split_batch
from pippy.runtime.comm import PipeAbortedError, PipeTimeoutError
from pippy.runtime.manual import _dec, _enc, _infos, _metas, _tensors, link_stages
from pippy.runtime.stage import Stage, StageError
from pippy.runtime.storesync import poll_keys
from pippy.runtime.watch import group_store

__all__ = ["infer_stage_shapes", "shapes_pending"]

_ROUNDS: dict[tuple[int, ...], int] = {}


def shapes_pending(stages: Sequence[Stage]) -> bool:
    """True while these hand-cut stages have not learned their shapes (built without ``input_args``), or when
    they learned them under another ``torch.autocast`` than this step's (autocast changes the dtypes sent).
    Every rank steps under the same autocast, so all of them learn again together.

        >>> from pippy.runtime.manual import module_stage
        >>> shapes_pending([module_stage(torch.nn.Linear(3, 5), 0, 1, "cpu")])  # no input_args
        True
        >>> shapes_pending([module_stage(torch.nn.Linear(3, 5), 0, 1, "cpu", input_args=torch.ones(2, 3))])
        False
    """
    pipe = stages[0].pipe
    if not getattr(pipe, "manual", False):
        return False
    return bool(getattr(pipe, "pending", False)) or getattr(pipe, "shaped_under", None) != autocast_state()


def infer_stage_shapes(stages: Sequence[Stage], group: Any, timeout: float, n_microbatches: int,
                       args: tuple[Any, ...], kwargs: dict[str, Any],
                       failed: Callable[[], str | None] = lambda: None) -> None:
    """Learn every stage's input and output shapes from the first micro-batch, then link the chain (see module).

    ``failed`` returns another rank's failure notice, if one was posted: the waits stop on it. Here one
    rank holds both stages of a chain and learns their shapes from a batch of 4 rows in 2 micro-batches:

        >>> from pippy.runtime.manual import module_stage
        >>> _ = dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> stages = [module_stage(torch.nn.Linear(3, 5), 0, 2, "cpu"), module_stage(torch.nn.Linear(5, 1), 1, 2, "cpu")]
        >>> infer_stage_shapes(stages, None, 60.0, 2, (torch.ones(4, 3),), {})
        >>> shapes_pending(stages), stages[1].describe_edges()
        (False, 'stage 1: in [float32[2, 5]] -> out [float32[2, 1]]')
        >>> dist.destroy_process_group()
    """
    group = group if group is not None else dist.group.WORLD
    store = group_store(group)
    if store is None:
        raise StageError(
            "hand-cut stages built without input_args learn their shapes through the process group's store, and "
            "this group has none (in-process runs included): pass input_args= (one micro-batch) to each stage"
        )
    ranks = tuple(dist.get_process_group_ranks(group))
    n = _ROUNDS[ranks] = _ROUNDS.get(ranks, 0) + 1
    prefix = f"pippy/{'-'.join(map(str, ranks))}/infer/{n}"
    num_stages = stages[0].pipe.num_stages
    first_args: tuple[Any, ...] = ()
    if any(st.index == 0 for st in stages):
        if not args:
            raise StageError("the rank holding stage 0 got no inputs in this step, so the stages cannot learn their "
                             "shapes; pass the batch to step()/eval() there")
        first_args = split_batch(tuple(args), {}, n_microbatches, stages[0].pipe.args_chunk_spec)[0][0]
    first_kwargs = split_batch((), dict(kwargs), n_microbatches, None,
                               stages[0].pipe.kwargs_chunk_spec)[0][1] if kwargs else {}

    def wait(s: int) -> list[Any]:
        key = f"{prefix}/{s}"
        missing, notice = poll_keys(store, {s: key}, timeout, failed)
        if notice is not None:
            raise PipeAbortedError(
                f"rank {dist.get_rank(group)}: stopped waiting for the shapes of stage {s} (learned in this step): "
                f"another rank failed first. That rank says: {notice}"
            )
        if missing:
            raise PipeTimeoutError(
                f"rank {dist.get_rank(group)}: waited {timeout:g}s for the shapes of stage {s}, which hand-cut stages "
                f"learn one after another in their first step (and under a new torch.autocast). Expected the rank "
                f"holding stage {s} to start this step too, under the same autocast; or pass input_args= to every stage"
            )
        return list(json.loads(store.get(key).decode()))

    for st in sorted(stages, key=lambda x: x.index):
        if st.index == 0:
            ins = _tensors(list(first_args), "the first micro-batch's positional inputs", 0)
        else:
            metas = [_dec(m) for m in wait(st.index - 1)[1]]
            ins = [torch.zeros(m.shape or (), dtype=m.dtype, device=st.device) for m in metas]
        outs = _tensors(_run_once(st, ins, first_kwargs), f"the output of stage {st.index}", st.index)
        metas_in = _metas(ins, st.index > 0)
        if st.index > 0 and not any(m.requires_grad for m in metas_in):
            raise StageError(
                f"stage {st.index}: its inputs from stage {st.index - 1} are not floating point, so no gradient "
                "flows into it; pass input_args= to every stage for such a chain"
            )
        metas_out = _metas(outs, True)
        st.info = _infos(st.index, num_stages, st.submod, metas_in, metas_out)  # what link_stages reads of this rank
        store.set(f"{prefix}/{st.index}", json.dumps([[_enc(m) for m in metas_in], [_enc(m) for m in metas_out]]))
    others = {str(s): wait(s) for s in range(num_stages)}
    link_stages(stages, others)
    for st in stages:  # messages about the shapes then say where they came from
        setattr(st.pipe, "learned", True)  # noqa: B010


def _run_once(stage: Stage, ins: list[torch.Tensor], kwargs: dict[str, Any]) -> Any:
    """The stage's module on ``ins``, leaving no trace: no autograd, buffers (batch norm's statistics) and the
    random streams (dropout) as they were, so the step itself runs as if this never happened."""
    buffers = [(b, b.detach().clone()) for b in stage.submod.buffers()]
    devices = [stage.device] if stage.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        out = stage.submod(*ins, **kwargs)
        for b, was in buffers:
            b.copy_(was)
    return out


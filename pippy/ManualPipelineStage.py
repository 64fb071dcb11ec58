"""PiPPy's hand-cut stage: ``ManualPipelineStage(module, stage_index, num_stages, device, n_microbatches, input_args)``.

The stage runs the user's own module (no tracing) under every pippy schedule; stage ``i``
reads all outputs of stage ``i - 1``. Also here: PiPPy's shape helpers for such stages.

    >>> import torch
    >>> shapes = extract_metadata_from_tensor(create_metadata_tensor([torch.ones(2, 3), torch.ones(4)]))
    >>> shapes
    [torch.Size([2, 3]), torch.Size([4])]
    >>> stage = ManualPipelineStage(torch.nn.Linear(3, 5), 0, 1, "cpu", 2, input_args=torch.ones(2, 3))
    >>> stage.forward_one_chunk([torch.ones(2, 3)]).shape
    torch.Size([2, 5])
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pippy.runtime.comm import PipeTimeoutError
from pippy.runtime.manual import ManualStage, exchange, link_stages
from pippy.runtime.transport import default_timeout

__all__ = [
    "ManualPipelineStage",
    "create_empty_tensors",
    "create_metadata_tensor",
    "extract_metadata_from_tensor",
    "get_stage_shapes",
    "validate_stage_shapes",
]

METADATA_TENSOR_LEN = 100  # int32 slots of a shape message
PLACEHOLDER_VAL = -1  # an unused slot


class ManualPipelineStage(ManualStage):
    """A stage from the user's own module: see :class:`pippy.runtime.manual.ManualStage` and the module doc.

    ``stage_id=`` is accepted for ``stage_index=`` (the spelling of PiPPy's older scripts).
    """

    def __init__(self, submodule: nn.Module, stage_index: int | None = None, num_stages: int | None = None,
                 device: torch.device | str | None = None, num_microbatches: int | None = None, input_args: Any = None,
                 output_args: Any = None, group: Any = None, *, stage_id: int | None = None) -> None:
        index = stage_index if stage_id is None else stage_id
        missing = [n for n, v in (("stage_index", index), ("num_stages", num_stages), ("device", device),
                                  ("num_microbatches", num_microbatches), ("input_args", input_args)) if v is None]
        if missing or (stage_index is not None and stage_id is not None):
            raise TypeError(
                f"ManualPipelineStage(submodule, stage_index, num_stages, device, num_microbatches, input_args, "
                f"output_args=None, group=None): missing {missing}" if missing else
                "ManualPipelineStage: pass stage_index or its old name stage_id, not both"
            )
        assert index is not None and num_stages is not None and device is not None and num_microbatches is not None
        super().__init__(submodule, index, num_stages, device, num_microbatches, input_args, output_args, group)

    def forward_one_chunk(self, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> Any:
        """Run this stage's module on one micro-batch's inputs, here, with no communication; returns its output."""
        return self.submod(*args, **(kwargs or {}))


def create_empty_tensors(tensor: torch.Tensor | Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Uninitialized tensors shaped like ``tensor`` (one or a list) on ``device``.

        >>> [t.shape for t in create_empty_tensors(torch.ones(2), "cpu")]
        [torch.Size([2])]
    """
    if isinstance(tensor, torch.Tensor):
        return [torch.empty_like(tensor, device=device)]
    if isinstance(tensor, list | tuple):
        return [torch.empty_like(t, device=device) for t in tensor]
    raise TypeError(f"create_empty_tensors: expected a tensor or a list of tensors, got {type(tensor).__name__}")


def create_metadata_tensor(tensors: Sequence[torch.Tensor] | None = None,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """The shapes of ``tensors`` packed as ``[ndim, d0, d1, ..., ndim, ...]`` in a fixed-size int32 tensor (-1 padded).

        >>> create_metadata_tensor([torch.ones(2, 3)])[:4].tolist()
        [2, 2, 3, -1]
    """
    out = torch.full((METADATA_TENSOR_LEN,), PLACEHOLDER_VAL, dtype=torch.int32, device=device)
    data = [v for t in (tensors or []) for v in (t.dim(), *t.shape)]
    if len(data) > METADATA_TENSOR_LEN:
        raise ValueError(
            f"create_metadata_tensor: the shapes need {len(data)} slots but a shape message has {METADATA_TENSOR_LEN}; "
            "send fewer or lower-rank tensors per stage"
        )
    if data:
        out[: len(data)] = torch.tensor(data, dtype=torch.int32, device=device)
    return out


def extract_metadata_from_tensor(tensor: torch.Tensor) -> list[torch.Size]:
    """The shapes packed by :func:`create_metadata_tensor`."""
    vals = tensor.tolist()
    shapes, i = [], 0
    while i < len(vals) and vals[i] != PLACEHOLDER_VAL:
        n = int(vals[i])
        shapes.append(torch.Size(int(v) for v in vals[i + 1 : i + 1 + n]))
        i += n + 1
    return shapes


def _wait(work: Any, what: str, timeout: float) -> None:
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as exc:
        raise PipeTimeoutError(f"get_stage_shapes: {what} did not complete within {timeout:.0f}s ({exc}); every "
                               "rank must call get_stage_shapes with its own stages") from exc


def get_stage_shapes(stage_modules: Sequence[nn.Module], stage_ids: Sequence[int], num_stages: int, rank: int,
                     world_size: int, device: torch.device | str, microbatch: Any = None) -> dict[int, dict[str, Any]]:
    """Dry-run this rank's stages in chain order and return ``{stage: {"inputs": [Size], "outputs": [Size]}}``.

    Stage ``s`` lives on rank ``s % world_size`` (loop placement). Stage 0 runs on ``microbatch``;
    a stage whose predecessor is on this rank takes its outputs directly, any other receives its
    input shapes from the rank before it (messages on ``device``, so NCCL works). Every rank must
    call this.

        >>> shapes = get_stage_shapes([torch.nn.Linear(4, 2), torch.nn.Linear(3, 4)], [1, 0], 2, 0, 1, "cpu",
        ...                           microbatch=torch.ones(5, 3))
        >>> shapes[1]["inputs"], shapes[1]["outputs"]
        ([torch.Size([5, 4])], [torch.Size([5, 2])])
    """
    timeout = default_timeout()
    pending: list[Any] = []
    shapes: dict[int, dict[str, Any]] = {}
    local: dict[int, list[torch.Tensor]] = {}  # outputs of this rank's stages, by stage
    for sid, module in sorted(zip(stage_ids, stage_modules), key=lambda pair: pair[0]):
        if sid % world_size != rank:
            raise ValueError(
                f"get_stage_shapes: stage {sid} belongs on rank {sid % world_size} (stage s on rank s % world_size), "
                f"not on rank {rank}"
            )
        if sid == 0:
            if microbatch is None:
                raise ValueError(f"get_stage_shapes: rank {rank} holds stage 0, so it needs microbatch=...")
            inputs = [microbatch] if isinstance(microbatch, torch.Tensor) else list(microbatch)
        elif sid - 1 in local:
            inputs = local[sid - 1]
        else:
            meta = create_metadata_tensor(device=device)
            _wait(dist.irecv(meta, (sid - 1) % world_size), f"rank {rank} receiving the input shapes of stage {sid}",
                  timeout)
            inputs = [torch.empty(s, device=device) for s in extract_metadata_from_tensor(meta)]
        with torch.no_grad():
            out = module(*inputs)
        outs = create_empty_tensors(out, device)
        local[sid] = outs
        shapes[sid] = {"inputs": [t.shape for t in inputs], "outputs": [t.shape for t in outs]}
        nxt = (sid + 1) % world_size
        if sid != num_stages - 1 and nxt != rank:
            pending.append(dist.isend(create_metadata_tensor(outs, device=device), nxt))
    for work in pending:
        _wait(work, f"rank {rank} sending stage shapes", timeout)
    return shapes


def validate_stage_shapes(pipeline_stages: Sequence[ManualStage]) -> None:
    """Check with every rank that each stage's outputs match the next stage's inputs; ``ValueError`` names the pair.

    Collective: every rank of the stages' group calls it with its own stages.
    """
    if not pipeline_stages:
        raise ValueError("validate_stage_shapes: no stages given")
    link_stages(pipeline_stages, exchange(pipeline_stages, pipeline_stages[0].group))

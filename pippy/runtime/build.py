"""Build the runtime stage of a split pipe on this rank: its own copy of its tensors, filled and ready.

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> pipe = pipeline(net, 2, (torch.ones(4, 4),), split_spec={"0": SplitPoint.END})
    >>> stage = build_stage(pipe, 1, "cpu", recompute=True)
    >>> stage, sorted(stage.state_dict())
    (PipelineStage(index=1, of=2, device=cpu), ['1.bias', '1.weight'])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from pippy.frontend.materialize import Checkpoint, materialize_stage
from pippy.frontend.pipe import SplitPipe
from pippy.runtime.recompute import enable_recompute
from pippy.runtime.userstage import PipelineStage

__all__ = ["build_stage", "pipeline_group"]


def pipeline_group(group: Any, pp_dim: str = "pp", where: str = "build_stage") -> Any:
    """``group`` itself, or the pipeline dimension's group when ``group`` is a ``DeviceMesh``.

        >>> pipeline_group(None) is None
        True
    """
    if not isinstance(group, DeviceMesh):
        return group
    names = tuple(group.mesh_dim_names or ())
    if group.ndim == 1 and names in ((), (pp_dim,)):
        return group.get_group()
    if pp_dim not in names:
        raise ValueError(
            f"{where}: the device mesh has dimensions {names or '(unnamed)'} of sizes {tuple(group.shape)}, and no "
            f"{pp_dim!r} dimension for the pipeline. Expected a mesh with a pipeline dimension, e.g. "
            f"init_device_mesh(device, (dp, pp), mesh_dim_names=('dp', {pp_dim!r})); or pass pp_dim=<the name of "
            "the pipeline dimension>, or group=mesh[<name>].get_group()"
        )
    return group[pp_dim].get_group()


def build_stage(
    pipe: SplitPipe,
    i: int,
    device: torch.device | str,
    group: Any = None,
    *,
    checkpoint: Checkpoint | None = None,
    init_fn: Callable[[nn.Module], None] | None = None,
    recompute: bool | Literal["full", "pointwise"] = False,
    pp_dim: str = "pp",
) -> PipelineStage:
    """Stage ``i`` of ``pipe`` on ``device`` with its own copy of its parameters (``pipe.build_stage``).

    For a model traced on the meta device, ``checkpoint`` (a state_dict, a ``torch.save`` or
    ``.safetensors`` file of the full model, keyed by original FQNs) and/or ``init_fn`` (called
    on the original modules, e.g. HF's ``model._init_weights``; default ``reset_parameters``)
    fill only this stage's tensors (without either, meta tensors stay as NaN placeholders until
    ``pippy.frontend.materialize.materialize_stage``). ``recompute=True`` (or ``"full"``) recomputes
    activations in backward; ``"pointwise"`` recomputes only elementwise chains (see
    :func:`pippy.recompute.enable_recompute`). ``group`` is the pipeline's process group (default: the whole world), or a
    ``DeviceMesh`` whose dimension ``pp_dim`` is the pipeline (a 1-D mesh is used as is).
    """
    stage = PipelineStage(pipe, i, device, pipeline_group(group, pp_dim, f"build_stage({i})"))
    if checkpoint is not None or init_fn is not None:
        materialize_stage(stage, checkpoint=checkpoint, init_fn=init_fn, model=pipe.source_model())
    if recompute:
        enable_recompute(stage, "full" if recompute is True else recompute)
    return stage

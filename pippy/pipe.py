"""The public Pipe and ``pipeline()``: the frontend's split model plus ``build_stage``, which makes the runtime stage.

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> pipe = pipeline(net, 2, example_args=(torch.randn(4, 4),), split_spec={"1": SplitPoint.END})
    >>> pipe.num_stages, pipe.build_stage(1, "cpu")
    (2, PipelineStage(index=1, of=2, device=cpu))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from pippy.frontend.materialize import Checkpoint
from pippy.frontend.pipe import SplitPipe, SplitPolicy, trace_and_split
from pippy.frontend.trace import SplitPoint
from pippy.runtime.api import PipelineStage
from pippy.runtime.build import build_stage

__all__ = ["Pipe", "pipeline"]


class Pipe(SplitPipe):
    """A model split into ``num_stages`` stage modules plus the edges between them; ``print(pipe)`` shows them.

    Made by :func:`pipeline`. ``get_stage_module(i)`` returns a module whose ``state_dict`` keys
    are the original model's FQNs; ``build_stage(i, device)`` makes the runtime stage.

        >>> import torch
        >>> pipe = pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),))
        >>> print(pipe)
        Pipe(Linear: 1 stages, 1 chunks)
        def forward(self, in0):
            (s0_0,) = self.submod_0(in0)  # 6 params
            return unflatten((s0_0,))
        edges:
    """

    def build_stage(
        self,
        i: int,
        device: torch.device | str,
        group: Any = None,
        *,
        checkpoint: Checkpoint | None = None,
        init_fn: Callable[[nn.Module], None] | None = None,
        recompute: bool = False,
    ) -> PipelineStage:
        """The runtime stage ``i`` on ``device``: see :func:`pippy.runtime.build.build_stage`.

        Under torchrun: ``pipe.build_stage(dist.get_rank(), torch.device("cpu"))``, or, for a model
        traced on the meta device, ``pipe.build_stage(rank, "cuda", checkpoint="model.safetensors")``.

            >>> pipe = pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),))
            >>> pipe.build_stage(0, "cpu").is_last
            True
        """
        return build_stage(self, i, device, group, checkpoint=checkpoint, init_fn=init_fn, recompute=recompute)


def pipeline(
    module: nn.Module,
    num_chunks: int,
    example_args: tuple[Any, ...] = (),
    example_kwargs: dict[str, Any] | None = None,
    split_spec: Mapping[str, SplitPoint] | None = None,
    split_policy: SplitPolicy | None = None,
    *,
    args_chunk_spec: Any = None,
    kwargs_chunk_spec: Any = None,
    tied_weights: str = "replicate",
    recompute_inputs: bool = True,
) -> Pipe:
    """Trace ``module`` on one micro-batch of the example batch and split it into stages.

    Split points come from ``pipe_split()`` calls in ``forward``, ``annotate_split_points``, a
    ``split_spec`` mapping (applied only while tracing) or a ``split_policy``. ``example_args`` is
    the full batch; it must split into ``num_chunks`` equal micro-batches. ``tied_weights``
    ("replicate" or "transmit") says how a weight read by several stages is kept;
    ``recompute_inputs`` rebuilds masks and other input-only values in later stages instead of
    sending them (see :func:`pippy.frontend.pipe.trace_and_split`).

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> pipe = pipeline(net, 2, (torch.randn(2, 4),), split_spec={"0": SplitPoint.END})
        >>> print(pipe.num_stages)
        2
    """
    return trace_and_split(
        module, num_chunks, example_args, example_kwargs, split_spec, split_policy,
        args_chunk_spec=args_chunk_spec, kwargs_chunk_spec=kwargs_chunk_spec, tied_weights=tied_weights,
        recompute_inputs=recompute_inputs, pipe_cls=Pipe,
    )

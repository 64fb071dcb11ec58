"""What one step of the executor takes (StepInputs), keeps between its actions (_Step) and returns (StepResult).

A training step of one rank over 2 micro-batches, each loss scaled by 1/2: the outputs are the
model's, one loss per micro-batch, and the stage's gradients those of the full batch's mean loss:

    >>> import torch
    >>> from pippy import pipeline
    >>> from pippy.runtime.executor import Executor
    >>> from pippy.runtime.localcomm import LocalTransport
    >>> from pippy.runtime.stage import Stage
    >>> from pippy.schedules.generators import one_f_one_b
    >>> from pippy.schedules.lower import lower
    >>> net, x, y = torch.nn.Linear(3, 1), torch.randn(4, 3), torch.randn(4, 1)
    >>> pipe = pipeline(net, 2, (x,)); stage = Stage(pipe, 0)
    >>> inputs = StepInputs(pipe.split_inputs((x,), {}, 2), list(y.chunk(2)), torch.nn.functional.mse_loss,
    ...                     training=True, loss_scale=1 / 2)
    >>> result = Executor([stage], lower(one_f_one_b(1, 2)), LocalTransport.world(1)[0]).run_blocking(inputs)
    >>> torch.nn.functional.mse_loss(net(x), y).backward()
    >>> torch.allclose(torch.cat(result.outputs), net(x), atol=1e-6), len(result.losses)
    (True, 2)
    >>> torch.allclose(stage.submod.weight.grad, net.weight.grad, atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pippy.runtime.receives import Posted
from pippy.runtime.transport import WaitContext
from pippy.sim.timeline import Event

__all__ = ["StepInputs", "StepResult", "add_grad"]


@dataclass(slots=True)
class StepInputs:
    """What one step needs on this rank (only the ranks holding the first/last stage get data)."""

    microbatches: list[list[Any]] | None
    targets: list[Any] | None
    loss_fn: Callable[..., torch.Tensor] | None
    training: bool
    loss_scale: float = 1.0
    keep_outputs: bool = True
    check_finite: bool = False  # raise where a loss is NaN or infinite (one host sync per micro-batch)
    # called once with the first micro-batch's (output, target, loss): returns the loss scale of this and later ones
    probe: Callable[[Any, Any, torch.Tensor], float] | None = None
    # a loss averaged over counted targets (runtime/countedmean.py): each micro-batch's count and the step's; the
    # loss_fn is then its sum form, divided by the step's count (backward) and by its own (the loss reported)
    counts: tuple[list[torch.Tensor], torch.Tensor] | None = None
    phase: int = 0  # the message tags' phase (plan.Edge.tag): call count mod 2, twice, + training, + 4 x schedule parity
    # hand-cut stages: per micro-batch, the keyword inputs this rank's step() got for its own stages
    stage_kwargs: list[dict[str, Any]] | None = None
    # the model's own counted-mean loss (pippy.runtime.ownscale): its counts; own_trained: the step trains on it
    own: Any = None
    own_trained: bool = False


@dataclass(slots=True)
class StepResult:
    """Per-micro-batch outputs (last stage only), unscaled losses, and the trace if recorded."""

    outputs: list[Any] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    peak_live: dict[int, int] = field(default_factory=dict)
    peak_bytes: dict[int, int] = field(default_factory=dict)
    own_counts: list[torch.Tensor] = field(default_factory=list)  # the own counted loss's, per micro-batch


@dataclass(slots=True)
class _Step:
    """Everything one step keeps between actions; thrown away at its end."""

    inp: StepInputs
    res: StepResult = field(default_factory=StepResult)
    received: dict[tuple[int, int], dict[int, Any]] = field(default_factory=dict)  # (stage, mb) -> input k -> value
    out_grads: dict[tuple[int, int], list[torch.Tensor | None]] = field(default_factory=dict)  # summed per output
    in_grads: dict[tuple[int, int], list[torch.Tensor | None]] = field(default_factory=dict)  # waiting for SEND_B
    in_shapes: dict[tuple[int, int, int], tuple[int, ...]] = field(default_factory=dict)  # received varying shapes
    sends: list[tuple[Any, WaitContext]] = field(default_factory=list)
    outputs: dict[int, Any] = field(default_factory=dict)
    prefetched: dict[int, list[Posted]] = field(default_factory=dict)
    i_done: set[tuple[int, int]] = field(default_factory=set)
    fill: bool = False
    user_grads: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (user's micro-batch, grad)


def add_grad(acc: dict[tuple[int, int], list[torch.Tensor | None]], key: tuple[int, int], n: int, j: int,
             g: torch.Tensor) -> None:
    """Sum gradient ``g`` into slot ``j`` of ``acc[key]`` (a list of ``n`` slots, created empty).

        >>> acc: dict = {}
        >>> add_grad(acc, (1, 0), 2, 0, torch.ones(2)); add_grad(acc, (1, 0), 2, 0, torch.ones(2))
        >>> acc[(1, 0)][0].tolist(), acc[(1, 0)][1]  # stage 1, micro-batch 0: output 0 got two, output 1 none
        ([2.0, 2.0], None)
    """
    slots = acc.setdefault(key, [None] * n)
    prev = slots[j]
    slots[j] = g if prev is None else prev + g

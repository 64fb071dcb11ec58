"""Gradients of the user's own inputs: a batch that requires grad gets its ``.grad``, as from the unpipelined model.

The stages that read a user input take its micro-batch (a view of the user's tensor) as a
detached leaf. When that micro-batch requires grad, the leaf does too; its gradient from B (or
I) is then sent back through the micro-batch split, once per step, into the user's tensor.

A gradient that would have to come back from a later stage needs a message that the trace
planned: only for values traced as requiring grad. An input traced without it but requiring grad
now is refused where its value leaves the stage (:func:`check_traced`), instead of summing part
of its gradient.

    >>> import torch
    >>> from pippy.frontend.split import USER, InputRef
    >>> x = torch.ones(4, 2, requires_grad=True)
    >>> mbs = [[part] for part in x.tensor_split(2)]
    >>> grads: list = []
    >>> collect(grads, [InputRef(USER, 0)], [torch.full((2, 2), 3.0)], mbs[0])
    >>> flush(grads)
    >>> x.grad[:, 0].tolist()
    [3.0, 3.0, 0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pippy.frontend.split import USER, InputRef, StageInfo
from pippy.runtime.stage import StageError

__all__ = ["check_traced", "collect", "flush", "wanted"]


def wanted(info: StageInfo, inputs: Sequence[Any], training: bool) -> set[int]:
    """Positions of the user inputs among ``inputs`` (one micro-batch of stage ``info``) that require grad.

        >>> import torch
        >>> from pippy import SplitPoint, pipeline
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> pipe = pipeline(net, 2, (torch.ones(4, 2),), split_spec={"0": SplitPoint.END})
        >>> x = torch.ones(2, 2, requires_grad=True)
        >>> wanted(pipe.stage_infos[0], [x], training=True), wanted(pipe.stage_infos[0], [x], training=False)
        ({0}, set())
    """
    if not training:
        return set()
    return {
        k for k, ref in enumerate(info.inputs)
        if ref.src_stage == USER and isinstance(inputs[k], torch.Tensor) and inputs[k].requires_grad
    }


def check_traced(where: str, info: StageInfo, grad_inputs: set[int], outputs: Sequence[Any], last: bool,
                 unfrozen: Callable[[], list[str]] = list) -> None:
    """Raise when an output of this forward carries a gradient that no message was planned for: from a user
    input that requires grad, or from parameters frozen when the model was traced and trainable now.

    ``grad_inputs`` are the positions :func:`wanted` gave, ``outputs`` the forward's outputs,
    ``unfrozen`` names the stage's parameters trainable now but frozen when traced; the last
    stage's outputs end in the loss here, so they need no message.

        >>> import torch
        >>> from pippy import SplitPoint, pipeline
        >>> net = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 1))  # stage 0 has no weights
        >>> pipe = pipeline(net, 2, (torch.ones(4, 2),), split_spec={"0": SplitPoint.END})
        >>> x = torch.ones(2, 2, requires_grad=True)
        >>> try:
        ...     check_traced("stage 0", pipe.stage_infos[0], {0}, [x.relu()], last=False)
        ... except StageError as e:
        ...     print(str(e).split(";")[0])
        stage 0: the user input input_1 requires grad, but the pipe was traced with an example that did not
    """
    if last:
        return
    for j, (o, meta) in enumerate(zip(outputs, info.outputs)):
        if isinstance(o, torch.Tensor) and o.requires_grad and not meta.requires_grad and not grad_inputs:
            names = unfrozen()
            to = sorted({c for c, _ in info.consumers[j]})
            raise StageError(
                f"{where}: output {j} ({info.output_names[j]}) now carries a gradient to stage(s) {to}, but the pipe "
                f"was traced with it carrying none, so no gradient message is planned and the gradients of "
                f"{', '.join(names) if names else 'this stage'} would be dropped. Expected the parameters frozen when "
                f"the model was traced to stay frozen; {'these were' if len(names) > 1 else 'this was'} unfrozen "
                "after it. Call pipeline() again after changing requires_grad (a frozen backbone unfrozen later "
                "needs a new pipe), or trace with it trainable and keep it out of the optimizer meanwhile"
            )
        if isinstance(o, torch.Tensor) and o.requires_grad and not meta.requires_grad:
            names = [info.input_names[k] for k in sorted(grad_inputs) if not info.input_meta[k].requires_grad]
            to = sorted({c for c, _ in info.consumers[j]})
            what = f"the user input {names[0]} requires" if len(names) == 1 else f"the user inputs {', '.join(names)} require"
            raise StageError(
                f"{where}: {what} grad, but the pipe was traced with an example that "
                f"did not; its gradient through output {j} ({info.output_names[j]}) from stage(s) {to} would be "
                "dropped, as the pipeline plans no gradient message for it. Expected the example inputs to require "
                "grad as the batch does: pipeline(model, n, example_args=(x.requires_grad_(),)), or detach the batch"
            )


def collect(grads: list[tuple[torch.Tensor, torch.Tensor]], refs: Sequence[InputRef],
            input_grads: Sequence[torch.Tensor | None], microbatch: Sequence[Any] | None) -> None:
    """Keep the gradients of one micro-batch's user inputs that require grad (``refs`` are the stage's inputs)."""
    if microbatch is None:
        return
    for ref, g in zip(refs, input_grads):
        if g is not None and ref.src_stage == USER:
            x = microbatch[ref.index]
            if isinstance(x, torch.Tensor) and x.requires_grad:
                grads.append((x, g))


def flush(grads: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Send the kept gradients back through the micro-batch split into the user's tensors, then forget them."""
    if grads:
        torch.autograd.backward([x for x, _ in grads], [g for _, g in grads])
        grads.clear()

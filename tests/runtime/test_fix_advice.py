"""The "how to fix" of a step's error fits its cause: batch dim, another dim, dtype, micro-batch count, loss_fn."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from models import Returns
from torch import nn

import pippy
from pippy import StageError, pipeline
from pippy.runtime.local import LocalPipeline

mse = nn.functional.mse_loss


def local(ret: str = "tensor", m: int = 4, loss_fn: Any = mse) -> LocalPipeline:
    pipe = pipeline(Returns(ret), 4, (torch.ones(8, 8),))
    return LocalPipeline(pipe, pippy.ScheduleGPipe, num_ranks=2, n_microbatches=m, loss_fn=loss_fn,
                         loss_reduction="mean")


def step_error(lp: LocalPipeline, x: torch.Tensor, y: Any = None) -> str:
    with pytest.raises((ValueError, StageError)) as info:
        lp.step(x, target=torch.ones(8, 4) if y is None else y)
    return str(info.value)


@pytest.mark.parametrize(("dtype", "cast"), [(torch.float64, "x.float()"), (torch.int64, "x.float()")])
def test_another_dtype_gets_a_cast_not_batch_size_advice(dtype: torch.dtype, cast: str) -> None:
    msg = step_error(local(), torch.ones(8, 8, dtype=dtype))
    assert f"dtype mismatch at input leaf 0 (args[0]): a micro-batch is {dtype} (shape (2, 8) as traced), but the " \
        f"pipeline was traced for torch.float32: cast it to torch.float32 ({cast})" in msg, msg
    assert "batch size" not in msg and "dynamic_shapes" not in msg, msg


def test_another_feature_size_names_the_dim_not_the_batch() -> None:
    msg = step_error(local(), torch.ones(8, 9))
    assert "Dim 1 is 9, traced as 8: not the batch dim" in msg and "{1: (lo, hi)}" in msg, msg
    assert "batch size" not in msg, msg


def test_a_schedule_with_another_microbatch_count_names_both_counts() -> None:
    msg = step_error(local(m=2), torch.ones(8, 8))
    assert "n_microbatches=2, but the pipe was traced with num_chunks=4" in msg, msg
    assert "Build the schedule with n_microbatches=4" in msg and "pass a batch of 4" in msg, msg
    local(m=2).step(torch.ones(4, 8), target=torch.ones(4, 4))  # the count it says works does work


def test_another_batch_size_keeps_the_batch_advice() -> None:
    msg = step_error(local(), torch.ones(16, 8))
    assert "The batch dim 0 differs (a batch of 16, traced with 8)" in msg and "dynamic_shapes" in msg, msg


@pytest.mark.parametrize(("ret", "pick"), [("dict", "out['logits']"), ("tuple", "out[0]")])
def test_a_model_output_that_is_not_a_tensor_points_at_loss_fn(ret: str, pick: str) -> None:
    msg = step_error(local(ret), torch.ones(8, 8))
    assert f"the model returns a {ret}, not a tensor: make loss_fn take the tensor" in msg, msg
    assert f"F.mse_loss({pick}, y)" in msg and "make step(target=...) match" not in msg, msg


@pytest.mark.parametrize(("loss_fn", "says"), [
    (lambda out, y: mse(out, y).item(), "returned a Python float: return the tensor itself (no .item() or float())"),
    (lambda out, y: None, "loss_fn returned None: is its return statement missing?"),
])
def test_a_loss_fn_returning_no_tensor_is_told_why(loss_fn: Any, says: str) -> None:
    msg = step_error(local(loss_fn=loss_fn), torch.ones(8, 8))
    assert says in msg and "reduction=" not in msg, msg


def test_a_target_of_another_dtype_gets_dtype_advice() -> None:
    msg = step_error(local(loss_fn=nn.functional.cross_entropy), torch.ones(8, 8), torch.ones(8, 4, dtype=torch.int64))
    assert "the target is int64 and the output float32" in msg and "y.long() of shape [batch]" in msg, msg

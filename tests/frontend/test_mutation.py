"""pippy.frontend.mutation: in-place writes after a dropout that returns its input (eval mode, ``p=0``) stay exact."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pippy import Schedule1F1B, ScheduleGPipe, ScheduleZBH1, SplitPoint, pipeline
from pippy.frontend.mutation import written_placeholders
from pippy.runtime.local import LocalPipeline


def _relu_(h: torch.Tensor) -> torch.Tensor:
    return torch.relu_(h)


def _relu_inplace(h: torch.Tensor) -> torch.Tensor:
    return F.relu(h, inplace=True)


def _zero_cols(h: torch.Tensor) -> torch.Tensor:
    h[:, :2] = 0
    return h


def _mul_(h: torch.Tensor) -> torch.Tensor:
    return h.mul_(3.0)


WRITES = [_relu_, _relu_inplace, _zero_cols, _mul_]


class DropThenWrite(nn.Module):
    """``a`` | split | an in-place op on ``drop(h)``, then ``b``: after the split, ``h`` is the stage's received input."""

    def __init__(self, write: Callable[[torch.Tensor], torch.Tensor], p: float = 0.5) -> None:
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(6, 6), nn.Dropout(p), nn.Linear(6, 4)
        self.write = write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.write(self.drop(self.a(x))))


def _check_step(model: nn.Module, pipe, cls, x: torch.Tensor, eval_stages: bool) -> None:
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=4, loss_fn=lambda o, t: ((o - t) ** 2).mean())
    if eval_stages:
        for st in lp.stages:
            st.submod.eval()
    t = torch.zeros(8, 4, dtype=torch.float64)
    assert torch.allclose(lp.eval(x), model(x).detach(), atol=1e-12, rtol=0)
    got = lp.step(x, target=t)
    want = model(x)
    ((want - t) ** 2).mean().backward()
    assert torch.allclose(got, want.detach(), atol=1e-12, rtol=0)
    grads = lp.named_grads()
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-12, rtol=0), n


@pytest.mark.parametrize("cls", [ScheduleGPipe, Schedule1F1B, ScheduleZBH1], ids=lambda c: c.__name__)
@pytest.mark.parametrize("write", WRITES, ids=lambda f: f.__name__)
def test_a_write_after_dropout_switched_to_eval_trains_exactly(cls, write) -> None:
    """Traced in train mode, run after ``stage.submod.eval()``: dropout then returns the received input itself, and
    the write went into that leaf ("a leaf Variable that requires grad is being used in an in-place operation")."""
    torch.manual_seed(0)
    model = DropThenWrite(write).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 4, (x,), split_spec={"a": SplitPoint.END})
    model.eval()
    _check_step(model, pipe, cls, x, eval_stages=True)


@pytest.mark.parametrize("write", WRITES, ids=lambda f: f.__name__)
def test_a_write_after_a_zero_dropout_trains_exactly(write) -> None:
    """``p=0`` in train mode returns the input itself too."""
    torch.manual_seed(0)
    model = DropThenWrite(write, p=0.0).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 4, (x,), split_spec={"a": SplitPoint.END})
    _check_step(model, pipe, Schedule1F1B, x, eval_stages=False)


def test_written_placeholders_follow_the_dropout_mode() -> None:
    x = torch.randn(8, 6, dtype=torch.float64)
    pipe = pipeline(DropThenWrite(_relu_).double(), 4, (x,), split_spec={"a": SplitPoint.END})
    graph = pipe.get_stage_module(1).graph
    assert written_placeholders(graph) == []  # train mode: dropout makes a new tensor
    drop = next(iter(graph.find_nodes(op="call_function", target=torch.ops.aten.dropout.default)))
    drop.update_arg(2, False)
    assert written_placeholders(graph) == [0]

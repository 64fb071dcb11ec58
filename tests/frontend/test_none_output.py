"""A model whose forward returns None: pipeline() warns, print(pipe) shows no output, a step says what to fix."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

import pippy
from pippy import StageError, pipe_split, pipeline
from pippy.runtime.local import LocalPipeline


class Net(nn.Module):
    def __init__(self, ret: str = "none") -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)
        self.ret = ret

    def forward(self, x: torch.Tensor) -> Any:
        h = self.a(x)
        pipe_split()
        out = self.b(h)
        return None if self.ret == "none" else (out, None) if self.ret == "pair" else out


def test_pipeline_warns_and_print_shows_no_output() -> None:
    with pytest.warns(UserWarning, match=r"pipeline\(Net\): the model's forward returns None.*return the output"):
        pipe = pipeline(Net(), 2, (torch.ones(4, 8),))
    text = str(pipe)
    assert "return None  # the model's forward returns None" in text and "unflatten" not in text, text
    assert "    self.submod_1(s0_0)" in text, text


@pytest.mark.parametrize("ret", ["tensor", "pair"])
def test_a_model_with_an_output_is_not_flagged(ret: str) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*returns None")
        pipe = pipeline(Net(ret), 2, (torch.ones(4, 8),))
    assert "return unflatten((s1_0" in str(pipe)


@pytest.mark.filterwarnings("ignore:pipeline\\(Net\\)")
def test_a_step_on_it_points_at_the_missing_return() -> None:
    lp = LocalPipeline(pipeline(Net(), 2, (torch.ones(4, 8),)), pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2,
                       loss_fn=nn.functional.mse_loss, loss_reduction="mean")
    with pytest.raises(StageError, match=r"the model's forward returns None: return its output"):
        lp.step(torch.ones(4, 8), target=torch.ones(4, 4))

"""A model whose forward returns None: pipeline() warns, print(pipe) shows no output, a step says what to fix."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import Returns
from torch import nn

import pippy
from pippy import StageError, pipeline
from pippy.runtime.local import LocalPipeline


def test_pipeline_warns_and_print_shows_no_output() -> None:
    with pytest.warns(UserWarning, match=r"pipeline\(Returns\): the model's forward returns None.*return the output"):
        pipe = pipeline(Returns("none"), 2, (torch.ones(4, 8),))
    text = str(pipe)
    assert "return None  # the model's forward returns None" in text and "unflatten" not in text, text
    assert "    self.submod_1(s0_0)" in text, text


@pytest.mark.parametrize("ret", ["tensor", "pair"])
def test_a_model_with_an_output_is_not_flagged(ret: str) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*returns None")
        pipe = pipeline(Returns(ret), 2, (torch.ones(4, 8),))
    assert "return unflatten((s1_0" in str(pipe)


@pytest.mark.filterwarnings("ignore:pipeline\\(Returns\\)")
def test_a_step_on_it_points_at_the_missing_return() -> None:
    lp = LocalPipeline(pipeline(Returns("none"), 2, (torch.ones(4, 8),)), pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2,
                       loss_fn=nn.functional.mse_loss, loss_reduction="mean")
    with pytest.raises(StageError, match=r"the model's forward returns None: return its output"):
        lp.step(torch.ones(4, 8), target=torch.ones(4, 4))

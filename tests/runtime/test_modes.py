"""A stage whose module mode (train / eval) differs from the trace's gets one warning naming the ops that ignore it."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import mse
from torch import nn

import pippy
from pippy import SplitPoint, pipeline
from pippy.runtime.local import LocalPipeline


def _net(dropout: bool) -> nn.Module:
    torch.manual_seed(0)
    mid: nn.Module = nn.Dropout(0.5) if dropout else nn.Tanh()
    return nn.Sequential(nn.Linear(4, 4), mid, nn.Linear(4, 4), nn.BatchNorm1d(4) if dropout else nn.Identity())


def _warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if "mode" in str(w.message)]


@pytest.mark.parametrize("traced", ["train", "eval"])
def test_stage_modules_start_in_the_traced_mode_and_a_change_warns_once(traced: str) -> None:
    net = getattr(_net(True), traced)()
    x = torch.randn(8, 4)
    pipe = pipeline(net, 2, (x,), split_spec={"1": SplitPoint.END})
    assert pipe.traced_training == (traced == "train")
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=mse)
    assert all(s.submod.training == (traced == "train") for s in lp.stages)
    assert _warnings(lambda: lp.eval(x)) == []  # unchanged mode: silent
    other = "eval" if traced == "train" else "train"
    for s in lp.stages:
        getattr(s.submod, other)()
    got = _warnings(lambda: lp.eval(x))
    assert len(got) == 2, got  # one per stage: stage 0 has the dropout, stage 1 the batch norm
    assert f"traced in {traced} mode" in got[0] and "dropout" in got[0] and f"pipeline(model.{other}()" in got[0]
    assert "batch_norm" in got[1]
    assert _warnings(lambda: lp.eval(x)) == []  # once per schedule


def test_a_graph_without_mode_dependent_ops_never_warns() -> None:
    x = torch.randn(8, 4)
    pipe = pipeline(_net(False), 2, (x,), split_spec={"1": SplitPoint.END})
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=mse)
    for s in lp.stages:
        s.submod.eval()
    assert _warnings(lambda: lp.step(x, target=torch.randn(8, 4))) == []


def test_attention_traced_with_dropout_counts_as_mode_dependent() -> None:
    from pippy.runtime.modes import mode_ops

    class Attn(nn.Module):
        def __init__(self, p: float) -> None:
            super().__init__()
            self.p, self.q = p, nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.q(x)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=self.p)

    x = torch.randn(2, 3, 4)
    assert mode_ops(pipeline(Attn(0.1), 1, (x,)).get_stage_module(0)) != []
    assert mode_ops(pipeline(Attn(0.0), 1, (x,)).get_stage_module(0)) == []

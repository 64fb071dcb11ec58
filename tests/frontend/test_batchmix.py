"""pipeline() warns where the model pairs the batch's rows with one another (in-batch negatives), and only there."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from models import gpt2
from torch import nn

from pippy import SplitPoint, pipeline
from pippy.frontend.trace import trace_count


class InBatch(nn.Module):
    """A contrastive loss over in-batch negatives: its logits are [B, B]."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u, v = self.a(x), self.b(y)
        logits = u @ v.T
        return F.cross_entropy(logits, torch.arange(x.shape[0]))


class Pairwise(nn.Module):
    """Pairwise differences of the rows: [B, B, d]."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return (h[:, None, :] - h[None, :, :]).pow(2).sum(-1)


class InBatchAutocast(InBatch):
    """The same, computed inside an autocast block of forward (a region torch.export keeps as a subgraph)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u, v = self.a(x), self.b(y)
        with torch.autocast("cpu", enabled=False):
            logits = u @ v.T
            return F.cross_entropy(logits, torch.arange(x.shape[0]))


def _warnings(model: nn.Module, args: tuple, chunks: int, spec: dict) -> list[str]:
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        pipeline(model, chunks, args, split_spec=spec)
    return [str(w.message) for w in got if "pairs the batch's rows" in str(w.message)]


@pytest.mark.parametrize("chunks", [2, 4])  # 4: one-row micro-batches
def test_in_batch_negatives_are_named_by_their_line(chunks: int) -> None:
    x = torch.randn(4, 8)
    said = _warnings(InBatch(), (x, x), chunks, {"a": SplitPoint.END})
    assert len(said) == 1 and "logits = u @ v.T" in said[0] and "test_batchmix.py" in said[0], said


def test_in_batch_negatives_inside_an_autocast_block_are_named() -> None:
    x = torch.randn(4, 8)
    said = _warnings(InBatchAutocast(), (x, x), 2, {"a": SplitPoint.END})
    assert len(said) == 1 and "logits = u @ v.T" in said[0], said


def test_pairwise_differences_are_named() -> None:
    said = _warnings(Pairwise(), (torch.randn(6, 8),), 2, {"a": SplitPoint.END})
    assert len(said) == 1 and "h[:, None, :] - h[None, :, :]" in said[0], said


def test_one_micro_batch_is_not_warned() -> None:
    assert _warnings(InBatch(), (torch.randn(4, 8), torch.randn(4, 8)), 1, {}) == []


@pytest.mark.parametrize("batch", [4, 8])  # 4: one-row micro-batches; 8: the micro-batch's size equals the heads x 2
def test_row_wise_models_are_not_warned_nor_traced_again(batch: int) -> None:
    x = torch.randint(0, 96, (batch, 16))
    before = trace_count()
    assert _warnings(gpt2(n_layer=2), (x,), 4, {"transformer.h.0": SplitPoint.END}) == []
    assert trace_count() - before == 1

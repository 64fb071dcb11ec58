"""pippy.runtime.owncount: a model's own mean loss over micro-batches counting different targets is warned about."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pippy import Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline
from pippy.runtime.local import LocalPipeline
from pippy.runtime.stage import Stage


class OwnLoss(nn.Module):
    """Returns its own loss, as a Hugging Face model given ``labels=`` does (shifted labels, like a causal LM)."""

    def __init__(self, kind: str = "ce") -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.b(torch.tanh(self.a(x)))[:, :-1].reshape(-1, 5)
        target = labels[:, 1:].reshape(-1)
        if self.kind == "nll":
            return F.nll_loss(F.log_softmax(logits, -1), target, ignore_index=0)
        if self.kind == "weight":
            return F.cross_entropy(logits, target, weight=torch.ones(5, dtype=logits.dtype))
        if self.kind == "sum":
            return F.cross_entropy(logits, target, reduction="sum") / 7
        return F.cross_entropy(logits, target) * 2.0


def _messages(kind: str, labels: torch.Tensor, sched: type = Schedule1F1B, train: bool = True) -> list[str]:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    model = OwnLoss(kind).double()
    pipe = pipeline(model, 2, (x, labels), split_spec={"a": SplitPoint.END})
    lp = LocalPipeline(pipe, sched, num_ranks=2, n_microbatches=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):  # warned once, not per step
            lp.step(x, labels) if train else lp.eval(x, labels)
    return [str(w.message) for w in seen if "counts" in str(w.message)]


UNEVEN = torch.tensor([[1, 2, 3], [1, -100, -100], [4, 1, 2], [3, 3, 3]])


@pytest.mark.parametrize("sched", [Schedule1F1B, ScheduleGPipe])
def test_uneven_counts_warn_once_naming_stage_and_fix(sched: type) -> None:
    msgs = _messages("ce", UNEVEN, sched)
    assert len(msgs) == 1
    assert "stage 1 (rank 1), micro-batch 1" in msgs[0]
    assert "micro-batch 0 counts 2 of them, micro-batch 1 4" in msgs[0]
    assert "loss_fn=torch.nn.CrossEntropyLoss(ignore_index=...)" in msgs[0] and "num_items_in_batch" in msgs[0]


def test_eval_warns_too() -> None:
    assert len(_messages("ce", UNEVEN, train=False)) == 1


def test_nll_loss_with_its_own_ignore_index() -> None:
    labels = torch.tensor([[1, 2, 3], [1, 0, 0], [4, 1, 2], [3, 3, 3]])  # 0 is the ignored class here
    assert "ignore_index=0" in _messages("nll", labels)[0]
    assert _messages("nll", labels.clamp(min=1)) == []


@pytest.mark.parametrize("kind", ["ce", "sum", "weight"])
def test_no_warning_when_even_or_not_a_counted_mean(kind: str) -> None:
    even = torch.tensor([[1, 2, 3], [1, -100, 2], [4, 1, 2], [3, -100, 3]])
    assert _messages(kind, even) == []
    if kind != "ce":  # a sum divided by a constant is exact; class weights are not checked
        assert _messages(kind, UNEVEN) == []


def test_stage_with_counter_pickles() -> None:
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stage = Stage(pipeline(OwnLoss().double(), 2, (x, UNEVEN), split_spec={"a": SplitPoint.END}), 1)
    assert stage._own_counts is not None
    again = pickle.loads(pickle.dumps(stage))
    assert again._own_counts is not None and again._own_counts.names == stage._own_counts.names

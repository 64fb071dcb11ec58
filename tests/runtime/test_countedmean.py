"""pippy.runtime.countedmean: losses averaged over counted targets (padding, class weights) stay exact when split."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pippy import Schedule1F1B, ScheduleGPipe, ScheduleZBH1, SplitPoint, pipeline
from pippy.runtime.local import LocalPipeline

W = torch.tensor([0.5, 2.0, 1.0, 0.25, 3.0], dtype=torch.float64)
LOSSES = [
    ("CrossEntropyLoss", nn.CrossEntropyLoss()),
    ("weighted, smoothed", nn.CrossEntropyLoss(weight=W, label_smoothing=0.1)),
    ("ignore_index=0", nn.CrossEntropyLoss(ignore_index=0)),
    ("NLLLoss", nn.NLLLoss()),
    ("F.cross_entropy", F.cross_entropy),
    ("partial", functools.partial(F.cross_entropy, weight=W)),
]


def _case(seq: bool, ignore: int = -100):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    x = torch.randn(8, 3, 4, dtype=torch.float64) if seq else torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(1, 5, (8, 3) if seq else (8,))
    pad = (slice(0, 2), slice(None)) if seq else slice(0, 2)
    y[pad] = ignore  # the first micro-batch is all padding
    y[5] = ignore
    return model, x, y


@pytest.mark.parametrize("seq", [False, True], ids=["rows", "tokens"])
@pytest.mark.parametrize(("name", "loss_fn"), LOSSES, ids=[n for n, _ in LOSSES])
@pytest.mark.parametrize("cls", [ScheduleGPipe, Schedule1F1B, ScheduleZBH1], ids=lambda c: c.__name__)
def test_padding_and_class_weights_give_the_full_batch_grads(cls, name, loss_fn, seq) -> None:
    """Micro-batches hold different numbers of counted targets (one holds none): grads equal the full batch's,
    where averaging micro-batch means would not, and an all-padding micro-batch adds nothing (no NaN)."""
    model, x, y = _case(seq, 0 if name == "ignore_index=0" else -100)
    ref = copy.deepcopy(model)

    def full(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # [N, L, C] logits: classes at dim 1
        return loss_fn(out.transpose(1, 2), target) if seq else loss_fn(out, target)

    pipe = pipeline(model, 4, (x,), split_spec={"1": SplitPoint.END})
    if seq:  # a sequence target needs the classes at dim 1, as nn.CrossEntropyLoss does: the model gives that
        pipe = pipeline(nn.Sequential(*model, _Transpose()), 4, (x,), split_spec={"1": SplitPoint.END})
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=4, loss_fn=loss_fn)
    losses: list[torch.Tensor] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp.step(x, target=y, losses=losses)
    full(ref(x), y).backward()
    grads = lp.named_grads()
    for n, p in ref.named_parameters():
        assert torch.isfinite(grads[n]).all(), n
        assert torch.allclose(grads[n], p.grad, atol=1e-12, rtol=0), n
    assert torch.isnan(losses[0])  # all padding: as loss_fn reports it
    with torch.no_grad():
        for k, (xs, ys) in enumerate(zip(x.chunk(4), y.chunk(4))):
            want = full(ref(xs), ys)
            assert torch.allclose(losses[k], want, equal_nan=True, atol=1e-12), k


class _Transpose(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.transpose(1, 2)


def test_a_sum_or_a_given_reduction_is_left_alone() -> None:
    model, x, _ = _case(False)
    pipe = pipeline(model, 4, (x,), split_spec={"1": SplitPoint.END})
    for loss_fn, given in ((nn.CrossEntropyLoss(reduction="sum"), None), (nn.CrossEntropyLoss(), "mean")):
        lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=loss_fn, loss_reduction=given)
        assert all(s._counted is None for s in lp.schedules)


def test_a_hugging_face_loss_given_num_items_in_batch_is_exact() -> None:
    """HF's own loss averages over labels that are not -100 per call; given the batch's count
    (``num_items_in_batch``), it sums and divides by it: pippy reads that as a sum, and grads are exact."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, eos_token_id=0, bos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    ids = torch.randint(0, 50, (8, 8))
    labels = ids.clone()
    labels[:3, 4:] = -100
    labels[5] = -100
    n = int((labels[:, 1:] != -100).sum())
    ref = copy.deepcopy(model)
    want = ref(ids, labels=labels).loss
    want.backward()
    pipe = pipeline(model, 4, (), {"input_ids": ids, "labels": labels, "num_items_in_batch": n},
                    split_spec={"transformer.h.0": SplitPoint.END})
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4)
    assert lp.schedules[-1].loss_reduction == "sum"
    got = lp.step(input_ids=ids, labels=labels, num_items_in_batch=n)
    assert torch.allclose(got["loss"], want, atol=1e-12)
    grads = lp.named_grads()
    for name, p in ref.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, atol=1e-12), name


class _ZLoss(nn.CrossEntropyLoss):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, target) + 0.1 * logits.logsumexp(-1).pow(2).mean()


def test_a_subclass_with_its_own_forward_is_left_alone() -> None:
    """A cross entropy subclass adding a z-loss: its terms are its own, so it is averaged over micro-batches as a
    mean-reduced loss is (exact without padding), not rewritten into a sum."""
    model, x, _ = _case(False)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    ref = copy.deepcopy(model)
    pipe = pipeline(model, 4, (x,), split_spec={"1": SplitPoint.END})
    lp = LocalPipeline(pipe, ScheduleGPipe, num_ranks=2, n_microbatches=4, loss_fn=_ZLoss())
    assert all(s._counted is None for s in lp.schedules)
    lp.step(x, target=y)
    _ZLoss()(ref(x), y).backward()
    for n, p in ref.named_parameters():
        assert torch.allclose(lp.named_grads()[n], p.grad, atol=1e-12), n

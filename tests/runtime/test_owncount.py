"""pippy.runtime.owncount / ownscale: a model's own mean loss over counted targets (``ignore_index``) is exact when
micro-batches count different targets, and warned about where it cannot be made so."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import assert_grads_equal
from torch import nn

from pippy import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B, ScheduleZBH1, ScheduleZBV, SplitPoint, pipeline
from pippy.runtime.local import LocalPipeline
from pippy.runtime.owncount import OwnLossCounts


class OwnLoss(nn.Module):
    """Returns its own loss, as a Hugging Face model given ``labels=`` does (shifted labels, like a causal LM)."""

    def __init__(self, kind: str = "ce") -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b, self.c, self.d = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 5)
        self.register_buffer("cw", torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25]))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> object:
        logits = self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))[:, :-1].reshape(-1, 5)
        target = labels[:, 1:].reshape(-1)
        if self.kind == "nll":
            return F.nll_loss(F.log_softmax(logits, -1), target, ignore_index=0)
        if self.kind == "weight":
            return F.cross_entropy(logits, target, weight=torch.ones(5, dtype=logits.dtype))
        if self.kind == "wbuf":  # class weights: the mean divides by the counted targets' summed weights
            return F.cross_entropy(logits, target, weight=self.cw)
        if self.kind == "wconst":
            return F.cross_entropy(logits, target, weight=torch.tensor([2.0, 1.0, 0.5, 4.0, 1.0], dtype=logits.dtype),
                                   label_smoothing=0.1)
        if self.kind == "wnll":
            return F.nll_loss(F.log_softmax(logits, -1), target, weight=self.cw * 2, ignore_index=0)
        if self.kind == "autocast":  # computed in a region of its own: torch.export keeps it as a subgraph call
            with torch.autocast("cpu", enabled=False):
                with torch.no_grad():
                    target = target.clone()
                return F.cross_entropy(logits, target, weight=self.cw)
        if self.kind == "sum":
            return F.cross_entropy(logits, target, reduction="sum") / 7
        if self.kind == "tuple":
            return F.cross_entropy(logits, target), logits
        if self.kind == "dict":
            return {"loss": F.cross_entropy(logits, target), "logits": logits}
        return F.cross_entropy(logits, target) * 2.0


UNEVEN = torch.tensor([[1, 2, 3], [1, -100, -100], [4, 1, 2], [3, 3, -100]] * 2)
SPLITS = {2: {"a": SplitPoint.END}, 4: {"a": SplitPoint.END, "b": SplitPoint.END, "c": SplitPoint.END}}


def _run(kind: str, labels: torch.Tensor, sched: type = Schedule1F1B, stages: int = 2, steps: int = 1,
         train: bool = True, x_grad: bool = False) -> tuple[list[str], float, float, LocalPipeline, nn.Module, Any]:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    model = OwnLoss(kind).double()
    ref = copy.deepcopy(model)
    pipe = pipeline(model, 4, (x, labels), split_spec=SPLITS[stages])
    lp = LocalPipeline(pipe, sched, num_ranks=2, n_microbatches=4)
    xr, xp = x.clone().requires_grad_(x_grad), x.clone().requires_grad_(x_grad)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(steps):  # gradients accumulate over steps, as in the plain model
            out = lp.step(xp, labels) if train else lp.eval(xp, labels)
            want = ref(xr, labels)
            if train:
                (want if isinstance(want, torch.Tensor) else want["loss"]).backward()
    msgs = [str(w.message) for w in seen if "counts" in str(w.message)]
    got = out if isinstance(out, torch.Tensor) else out["loss"] if isinstance(out, dict) else out[0]
    want_loss = want if isinstance(want, torch.Tensor) else want["loss"] if isinstance(want, dict) else want[0]
    return msgs, float(got.detach()), float(want_loss.detach()), lp, ref, (xp, xr)


@pytest.mark.parametrize("stages,sched", [(2, Schedule1F1B), (2, ScheduleGPipe), (2, ScheduleZBH1),
                                          (4, ScheduleInterleaved1F1B), (4, ScheduleZBV)])
@pytest.mark.parametrize("kind", ["ce", "nll", "dict", "wbuf", "wconst", "wnll", "autocast"])
def test_own_counted_mean_is_exact(kind: str, stages: int, sched: type) -> None:
    labels = UNEVEN.clamp(min=0) if kind in ("nll", "wnll") else UNEVEN  # nll: 0 is the ignored class
    msgs, got, want, lp, ref, _ = _run(kind, labels, sched, stages)
    assert msgs == []
    assert got == pytest.approx(want, rel=1e-13)
    assert_grads_equal(lp, ref)


def test_a_micro_batch_of_padding_only_counts_zero() -> None:
    labels = UNEVEN.clone()
    labels[2:4] = -100  # micro-batch 1: no target (its own mean is NaN; the full batch's is not)
    msgs, got, want, lp, ref, _ = _run("ce", labels)
    assert msgs == [] and got == pytest.approx(want, rel=1e-13)
    assert_grads_equal(lp, ref)


def test_check_finite_passes_a_micro_batch_of_padding_only() -> None:
    labels = UNEVEN.clone()
    labels[2:4] = -100
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    model = OwnLoss().double()
    ref = copy.deepcopy(model)
    lp = LocalPipeline(pipeline(model, 4, (x, labels), split_spec=SPLITS[2]), Schedule1F1B, num_ranks=2,
                       n_microbatches=4, check_finite=True)
    got = lp.step(x, labels)
    want = ref(x, labels)
    want.backward()
    assert float(got) == pytest.approx(float(want.detach()), rel=1e-13)
    torch.testing.assert_close(dict(lp.named_grads())["a.weight"], ref.a.weight.grad, rtol=1e-12, atol=1e-14)


def test_a_loss_fn_beside_the_own_loss_warns_when_counts_differ() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    pipe = pipeline(OwnLoss("dict").double(), 4, (x, UNEVEN), split_spec=SPLITS[2])
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=lambda out, y: out["loss"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lp.step(x, UNEVEN, target=torch.zeros(8))
    msgs = [str(w.message) for w in seen if "counts" in str(w.message)]
    assert len(msgs) == 1 and "pass no loss_fn" in msgs[0] and "action 1F1" in msgs[0]


def test_accumulated_steps_and_user_input_grad_are_exact() -> None:
    *_, lp, ref, (xp, xr) = _run("ce", UNEVEN, Schedule1F1B, 2, steps=2, x_grad=True)
    assert_grads_equal(lp, ref)
    torch.testing.assert_close(xp.grad, xr.grad, rtol=1e-12, atol=1e-14)


def test_eval_merges_the_counted_mean() -> None:
    msgs, got, want, *_ = _run("ce", UNEVEN, train=False)
    assert msgs == [] and got == pytest.approx(want, rel=1e-13)


def test_tuple_output_warns_once_naming_stage_and_fix() -> None:
    msgs = _run("tuple", UNEVEN, steps=2, train=False)[0]
    assert len(msgs) == 1
    assert "rank 1, stage 1, micro-batch 1, action 1F1" in msgs[0]
    assert "micro-batch 0 counts 2 of them, micro-batch 1 3" in msgs[0]
    assert "loss_fn=torch.nn.CrossEntropyLoss(ignore_index=...)" in msgs[0] and "num_items_in_batch" in msgs[0]
    assert _run("tuple", UNEVEN.clamp(min=0), train=False)[0] == []


@pytest.mark.parametrize("kind", ["sum", "weight"])
def test_sum_and_weighted_losses_are_left_alone(kind: str) -> None:
    msgs, got, want, *_ = _run(kind, UNEVEN.clamp(min=0))
    assert msgs == [] and got == pytest.approx(want, rel=1e-13)


def test_class_weights_are_read_from_the_running_stage() -> None:
    """Weights loaded into the stage after tracing (a checkpoint, a meta-device pipe) are the ones counted."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    model = OwnLoss("wbuf").double()
    pipe = pipeline(model, 4, (x, UNEVEN), split_spec=SPLITS[2])
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4)
    new = torch.tensor([4.0, 0.1, 1.0, 7.0, 2.0], dtype=torch.float64)
    lp.stages[-1].submod.get_buffer("cw").copy_(new)
    ref = copy.deepcopy(model)
    ref.cw.copy_(new)
    got = lp.step(x, UNEVEN)
    want = ref(x, UNEVEN)
    want.backward()
    assert float(got) == pytest.approx(float(want.detach()), rel=1e-13)
    assert_grads_equal(lp, ref)


class ProbTarget(OwnLoss):
    """Class probabilities as the target: the mean is over samples, whatever the class weights."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> object:
        logits = self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))
        probs = F.softmax(labels.to(logits.dtype) * torch.linspace(-1, 1, 5, dtype=logits.dtype), -1)
        return F.cross_entropy(logits.reshape(-1, 5), probs.reshape(-1, 5), weight=self.cw.to(logits.dtype))


def test_class_weights_with_probability_targets_stay_a_mean_over_samples() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 4, dtype=torch.float64), torch.randn(8, 3, 5, dtype=torch.float64)
    model = ProbTarget().double()
    ref = copy.deepcopy(model)
    lp = LocalPipeline(pipeline(model, 4, (x, y), split_spec=SPLITS[2]), Schedule1F1B, num_ranks=2,
                       n_microbatches=4)
    got = lp.step(x, y)
    want = ref(x, y)
    want.backward()
    assert float(got) == pytest.approx(float(want.detach()), rel=1e-13)
    torch.testing.assert_close(dict(lp.named_grads())["a.weight"], ref.a.weight.grad, rtol=1e-12, atol=1e-14)


class Chosen(OwnLoss):
    """Targets picked by a ``torch.cond`` (its branches are graphs, not tensors) or by the model's own logits."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> object:
        logits = self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))[:, :-1].reshape(-1, 5)
        target = labels[:, 1:].reshape(-1)
        if self.kind == "cond":
            target = torch.cond(target.sum() > 0, lambda t: t.clone(), lambda t: t.clone(), (target,))
        elif self.kind == "pseudo":
            target = logits.detach().argmax(-1)
        return F.cross_entropy(logits, target, weight=self.cw)


@pytest.mark.parametrize("kind", ["cond", "pseudo"])
def test_targets_not_read_from_the_inputs_alone_are_not_counted(kind: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    pipe = pipeline(Chosen(kind).double(), 4, (x, UNEVEN.clamp(min=0)), split_spec=SPLITS[2])
    assert OwnLossCounts.of(pipe.stage_infos[-1].module) is None
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4)
    assert torch.isfinite(lp.step(x, UNEVEN.clamp(min=0)))  # trained (was: a crash on the cond's branch graphs)


def test_class_weight_counts_are_summed_in_float64() -> None:
    """bfloat16 weights: 1001 targets of weight 1 sum to 1000 in bfloat16; the count is exact."""
    torch.manual_seed(0)
    model = OwnLoss("wbuf").to(torch.bfloat16)
    model.cw.fill_(1.0)
    x, labels = torch.randn(2, 1002, 4, dtype=torch.bfloat16), torch.randint(0, 5, (2, 1002))
    pipe = pipeline(model, 2, (x, labels), split_spec=SPLITS[2])
    counter = OwnLossCounts.of(pipe.stage_infos[-1].module)
    assert counter is not None and counter.weighted == [True]
    hidden, _ = pipe.stage_infos[0].module(x[:1], labels[:1])  # the last stage's inputs: (linear, labels)
    (count,) = counter.counts([hidden, labels[:1]])
    assert count.dtype == torch.float64 and float(count) == 1001.0


def test_a_micro_batch_whose_targets_all_weigh_zero_is_refused() -> None:
    """The loss op's backward divides by the summed weight: 0/0 would make every gradient NaN."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    model = OwnLoss("wbuf").double()
    model.cw.copy_(torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0]))
    labels = torch.tensor([[1, 0, 3], [1, 3, 0], [2, 1, 2], [4, 4, 1]] * 2)  # micro-batch 0: classes 0 and 3 only
    lp = LocalPipeline(pipeline(model, 4, (x, labels), split_spec=SPLITS[2]), Schedule1F1B, num_ranks=2,
                       n_microbatches=4)
    with pytest.raises(RuntimeError, match=r"counted targets all weigh 0.*ignore_index"):
        lp.step(x, labels)

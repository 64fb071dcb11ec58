"""pippy.runtime.stepinputs: a step's loss and its scale; ``step(loss_kwargs=)`` reads the reduction they name."""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pippy import Schedule1F1B, ScheduleGPipe, ScheduleZBH1, pipe_split, pipeline
from pippy.runtime.local import LocalPipeline
from pippy.runtime.loss import infer_reduction


class _Net(nn.Module):
    def __init__(self, d: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        pipe_split()
        h = torch.tanh(self.b(h))
        pipe_split()
        return self.c(h)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        x, y = torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)
        y[:3] = 0  # class 0 is padding where ignore_index=0: micro-batches count different targets
        out.append((x, y))
    return out


def _pair(cls: type, ranks: int, loss_fn: Any, **kw: Any) -> tuple[nn.Module, LocalPipeline]:
    torch.manual_seed(0)
    model = _Net().double()
    ref = copy.deepcopy(model)
    lp = LocalPipeline(pipeline(model, 4, (_batches(1)[0][0],)), cls, num_ranks=ranks, n_microbatches=4,
                       loss_fn=loss_fn, **kw)
    return ref, lp


def _train(ref: nn.Module, lp: LocalPipeline, loss_fn: Any, steps: list[dict[str, Any] | None]) -> None:
    """SGD steps (a constant factor on the gradients shows in SGD, not in Adam) with each step's ``loss_kwargs``:
    gradients after each step and parameters at the end equal the plain model's."""
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_p = torch.optim.SGD([p for st in lp.stages for p in st.parameters()], lr=0.1)
    for k, ((x, y), kw) in enumerate(zip(_batches(len(steps)), steps)):
        loss_fn(ref(x), y, **(kw or {})).backward()
        losses: list[torch.Tensor] = []
        lp.step(x, target=y, loss_kwargs=kw, losses=losses)
        grads = lp.named_grads()
        for n, p in ref.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=1e-12, msg=f"step {k} ({kw}): {n}")
        opt_r.step(), opt_p.step(), opt_r.zero_grad(), opt_p.zero_grad()
    params = {n: p for st in lp.stages for n, p in st.unwrapped.named_parameters()}
    for n, p in ref.named_parameters():
        torch.testing.assert_close(params[n], p, rtol=0, atol=1e-12, msg=n)


STEPS = [{"reduction": "sum"}, None, {"reduction": "sum", "ignore_index": 0}, {"ignore_index": 0},
         {"reduction": "mean", "label_smoothing": 0.2}]


@pytest.mark.parametrize(("cls", "ranks"), [(ScheduleGPipe, 3), (Schedule1F1B, 3), (ScheduleZBH1, 3)],
                         ids=["gpipe", "1f1b", "zbh1"])
def test_loss_kwargs_reduction_sum_is_read_at_each_step(cls, ranks) -> None:
    """``F.cross_entropy`` (a mean) stepped with ``loss_kwargs={"reduction": "sum"}`` on some steps: those steps
    sum (was: the micro-batch sums averaged, every gradient / 4), the others average, a counted mean with
    ``ignore_index`` stays exact; 5 SGD steps in float64 equal the plain model's."""
    ref, lp = _pair(cls, ranks, F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(ref, lp, F.cross_entropy, STEPS)


def test_loss_kwargs_mean_on_a_summing_partial_is_a_counted_mean() -> None:
    """``partial(F.cross_entropy, reduction="sum")`` stepped with ``reduction="mean"`` and padding: a mean over the
    counted targets of the whole batch (was: summed, 4 micro-batch means added up)."""
    loss = functools.partial(F.cross_entropy, reduction="sum")
    ref, lp = _pair(Schedule1F1B, 3, loss)
    _train(ref, lp, loss, [{"reduction": "mean", "ignore_index": 0}, None, {"reduction": "mean"}])


def test_legacy_size_average_false_sums() -> None:
    """torch's legacy ``size_average=False`` sums, in ``loss_kwargs`` and in a partial."""
    assert infer_reduction(functools.partial(F.mse_loss, size_average=False)) == "sum"
    assert infer_reduction(functools.partial(F.mse_loss, reduce=True, size_average=True)) == "mean"
    ref, lp = _pair(Schedule1F1B, 3, F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's deprecation of size_average
        _train(ref, lp, F.cross_entropy, [{"size_average": False}, None])


def test_a_reduction_loss_kwargs_change_is_measured_for_those_kwargs() -> None:
    """A plain function whose reduction a keyword picks: measured on the first step with each set of keywords
    (summed where they say so), and kept per set."""
    def loss(out: torch.Tensor, y: torch.Tensor, how: str = "avg") -> torch.Tensor:
        terms = F.cross_entropy(out, y, reduction="none")
        return terms.sum() if how == "total" else terms.mean()

    ref, lp = _pair(Schedule1F1B, 3, loss, loss_reduction=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(ref, lp, loss, [{"how": "total"}, {"how": "avg"}, None, {"how": "total"}, {"how": "avg"}])
    assert lp.schedules[-1]._kwargs_measured == {(("how", "total"),): "sum", (("how", "avg"),): "mean"}


def test_eval_loss_kwargs_report_each_micro_batch_s_loss() -> None:
    """``eval(x, target=y, losses=, loss_kwargs=)``: each micro-batch's loss with those keywords."""
    ref, lp = _pair(Schedule1F1B, 3, F.cross_entropy)
    x, y = _batches(1)[0]
    for kw in ({"reduction": "sum"}, {"reduction": "mean", "ignore_index": 0}):
        got: list[torch.Tensor] = []
        lp.eval(x, target=y, losses=got, loss_kwargs=kw)
        want = [float(F.cross_entropy(ref(a), b, **kw)) for a, b in zip(x.chunk(4), y.chunk(4))]
        assert [float(v) for v in got] == pytest.approx(want, abs=1e-12, nan_ok=True)


def test_loss_kwargs_that_contradict_loss_reduction_or_give_no_scalar_are_refused() -> None:
    """``loss_reduction="mean"`` with ``loss_kwargs={"reduction": "sum"}``: an error naming both (was: the sums
    averaged, silently); ``reduction="none"``: an error saying a micro-batch needs a scalar loss, in eval() too."""
    x, y = _batches(1)[0]
    _, lp = _pair(Schedule1F1B, 3, F.cross_entropy, loss_reduction="mean")
    with pytest.raises(ValueError, match=r"loss_kwargs=\{'reduction': 'sum'\} make loss_fn sum-reduce, but the "
                                         r"schedule was built with loss_reduction='mean'.*off by a factor of 4.*"
                                         r"pass loss_reduction='sum'"):
        lp.step(x, target=y, loss_kwargs={"reduction": "sum"})
    _, lp = _pair(Schedule1F1B, 3, F.cross_entropy, loss_reduction="sum")
    lp.step(x, target=y, loss_kwargs={"reduction": "sum"})  # agreeing is fine
    for run in ("step", "eval"):
        _, lp = _pair(Schedule1F1B, 3, F.cross_entropy)
        with pytest.raises(ValueError, match=r"stage 2 \(last\), action step loss_kwargs: loss_kwargs=\{'reduction': "
                                             r"'none', 'weight': float64\[5\]\} make loss_fn return one loss per "
                                             r"element, but each micro-batch needs a scalar loss"):
            getattr(lp, run)(x, target=y, loss_kwargs={"reduction": "none", "weight": torch.ones(5).double()})


def test_loss_kwargs_without_a_loss_fn_are_named_unused() -> None:
    """A model that returns its own loss, stepped with ``loss_kwargs``: a warning that nothing reads them (was: silent)."""
    class OwnLoss(_Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x).pow(2).mean()

    x, _ = _batches(1)[0]
    lp = LocalPipeline(pipeline(OwnLoss().double(), 4, (x,)), Schedule1F1B, num_ranks=3, n_microbatches=4)
    with pytest.warns(UserWarning, match=r"got loss_kwargs=\{'reduction': 'sum'\}, but the schedule has no loss_fn "
                                         r"\(the model's own loss is trained on\), so they are not used"):
        lp.step(x, loss_kwargs={"reduction": "sum"})


@pytest.mark.parametrize("scale,said,factor", [(True, "sum", 0.25), (False, "mean", 1.0)])
def test_torch_scale_grads_decides_over_loss_kwargs_as_in_torch(scale: bool, said: str, factor: float) -> None:
    # PyTorch's pipelining package scales by its flag whatever loss_kwargs say: 1/m for scale_grads=True
    ref, lp = _pair(Schedule1F1B, 3, F.cross_entropy, scale_grads=scale)
    x, y = _batches(1)[0]
    want = sum(F.cross_entropy(ref(xm), ym, reduction=said) for xm, ym in zip(x.chunk(4), y.chunk(4))) * factor
    want.backward()
    lp.step(x, target=y, loss_kwargs={"reduction": said})
    grads = lp.named_grads()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-12, atol=1e-14)


def test_a_loss_fn_of_its_own_may_take_reduction_none() -> None:
    w = torch.arange(1.0, 9.0, dtype=torch.float64)

    def weighted(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        per = F.cross_entropy(out, y, reduction=reduction)  # "none": per row, which it reduces itself
        return (per * w[: per.numel()]).sum() if reduction == "none" else per

    ref, lp = _pair(ScheduleGPipe, 3, weighted, loss_reduction="sum")
    x, y = _batches(1)[0]
    sum(weighted(ref(xm), ym, reduction="none") for xm, ym in zip(x.chunk(4), y.chunk(4))).backward()
    lp.step(x, target=y, loss_kwargs={"reduction": "none"})
    grads = lp.named_grads()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-12, atol=1e-14)

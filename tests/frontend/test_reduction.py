"""pippy.frontend.reduction: a scalar output's batch reduction read off the graph, so losses, grads and merges are exact."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pippy import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B, pipe_split, pipeline
from pippy.frontend.reduction import MicroBatch
from pippy.runtime.local import LocalPipeline

# (name, loss from out [B, T, 3] and target, the reduction a full batch's loss has over micro-batches)
LOSSES = [
    ("sum / shape[0]", lambda o, t: ((o - t) ** 2).sum() / o.shape[0], "mean"),
    ("sum / size(0) * 0.5", lambda o, t: ((o - t) ** 2).sum() * 0.5 / o.size(0), "mean"),
    ("len divides", lambda o, t: ((o - t) ** 2).sum() / len(o), "mean"),
    ("terms / shape[0], summed", lambda o, t: (((o - t) ** 2) / o.shape[0]).sum(), "mean"),
    ("token mean by count", lambda o, t: ((o - t) ** 2).sum() / (o.shape[0] * o.shape[1]), "mean"),
    ("mse sum / shape[0]", lambda o, t: F.mse_loss(o, t, reduction="sum") / o.shape[0], "mean"),
    ("sum / full batch literal", lambda o, t: ((o - t) ** 2).sum() / 8, "sum"),
    ("sum / feature count", lambda o, t: ((o - t) ** 2).sum() / 3, "sum"),
    ("per-row mean, summed", lambda o, t: ((o - t) ** 2).mean(dim=(1, 2)).sum(), "sum"),
    ("per-row sum, averaged", lambda o, t: ((o - t) ** 2).sum(dim=(1, 2)).mean(), "mean"),
    ("mean", lambda o, t: F.mse_loss(o, t), "mean"),
    ("batch mean, then summed", lambda o, t: ((o - t) ** 2).mean(0).sum(), "mean"),
    ("batch sum, then averaged", lambda o, t: ((o - t) ** 2).sum(0).mean(), "sum"),
    ("unreduced loss, batch mean", lambda o, t: F.mse_loss(o, t, reduction="none").mean(0).sum(), "mean"),
    ("keepdim batch sum", lambda o, t: ((o - t) ** 2).sum(0, keepdim=True).mean(), "sum"),
    ("plain sum", lambda o, t: ((o - t) ** 2).sum(), "sum"),
    ("half a sum", lambda o, t: 0.5 * ((o - t) ** 2).sum(), "sum"),
    ("sum / float literal", lambda o, t: ((o - t) ** 2).sum() / 2.0, "sum"),
    ("sum / int literal equal to the rows", lambda o, t: ((o - t) ** 2).sum() / 2, "sum"),
    ("sum / int literal equal to rows x seq", lambda o, t: ((o - t) ** 2).sum() / 10, "sum"),
    ("flattened, sum / shape[0]", lambda o, t: ((o - t) ** 2).reshape(-1).sum() / o.shape[0], "mean"),
]


class LossNet(nn.Module):
    """Two linear layers split by pipe_split(); the forward returns (out, its own loss, an unrelated sum)."""

    def __init__(self, loss) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.loss = loss

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.a(x))
        pipe_split()
        out = self.b(h)
        return {"loss": self.loss(out, target), "out": out, "total": out.sum()}


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(8, 5, 3, generator=g, dtype=torch.float64),
            torch.randn(8, 5, 3, generator=g, dtype=torch.float64))


@pytest.mark.parametrize(("name", "loss", "kind"), LOSSES, ids=[c[0] for c in LOSSES])
def test_own_loss_reduction_read_off_the_graph(name, loss, kind) -> None:
    torch.manual_seed(0)
    x, t = _data()
    pipe = pipeline(LossNet(loss).double(), 4, (x, t))
    assert pipe.output_reductions == [kind, None, "sum"], name


@pytest.mark.parametrize("cls", [ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B], ids=lambda c: c.__name__)
@pytest.mark.parametrize(("name", "loss", "kind"), LOSSES[:8], ids=[c[0] for c in LOSSES[:8]])
def test_own_loss_grads_and_outputs_equal_the_plain_model(cls, name, loss, kind) -> None:
    """The returned loss, the summed scalar output and every grad equal the plain model's on the full batch;
    before, a sum divided by ``x.shape[0]`` was taken for a sum, and grads came out ``n_microbatches`` times too big."""
    torch.manual_seed(0)
    model = LossNet(loss).double()
    ref = copy.deepcopy(model)
    x, t = _data()
    pipe = pipeline(model, 4, (x, t))
    ranks = 1 if cls is ScheduleInterleaved1F1B else 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reduction is known: no "cannot tell" warning
        lp = LocalPipeline(pipe, cls, num_ranks=ranks, n_microbatches=4)
    got = lp.step(x, t)
    want = ref(x, t)
    want["loss"].backward()
    for key in ("loss", "out", "total"):
        assert torch.allclose(got[key], want[key].detach(), atol=1e-12, rtol=0), key
    grads = lp.named_grads()
    for n, p in ref.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-12, rtol=0), n


def test_local_call_merges_scalars_by_their_reduction() -> None:
    """``pipe(x)`` on a whole number of micro-batches: outputs equal the model's when the graph bakes the size in
    (it falls back to micro-batches and merges a sum by summing), and when it does not."""

    class Baked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            h = self.a(x).reshape(2, 15)  # the traced micro-batch size (2 rows of 5 x 3), baked in
            pipe_split()
            return h.sum(), h.sum() / x.shape[0], h

    torch.manual_seed(0)
    model = Baked().double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    pipe = pipeline(model, 1, (x,))
    big = torch.randn(6, 5, 3, dtype=torch.float64)
    parts = [model(c) for c in big.chunk(3)]
    total, mean, h = pipe(big)
    assert torch.allclose(total, sum(p[0] for p in parts), atol=1e-12)
    assert torch.allclose(mean, sum(p[1] for p in parts) / 3, atol=1e-12)
    assert h.shape == (6, 15)


def test_micro_batch_counts_skip_one_row_inputs() -> None:
    mb = MicroBatch.of([(torch.zeros(2, 5, 3), 0), (torch.zeros(4, 1), 1), (torch.zeros(1, 7), 0)])
    assert mb.rows == frozenset({1, 2}) and mb.counts == frozenset({2, 10, 6, 30})  # one row (or column): no count


class _Extras(nn.Module):
    """A loss plus scalars no batched input reaches (a weight's norm, its mean) and a ``[1]``-shaped loss."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.a(x))
        pipe_split()
        out = self.b(h)
        return {"loss": F.mse_loss(out, t).reshape(1), "l2": self.b.weight.pow(2).sum(), "w": self.b.weight.mean(),
                "rows": out.sum(dim=(1, 2), keepdim=True)}


@pytest.mark.parametrize("cls", [ScheduleGPipe, Schedule1F1B])
def test_scalars_no_batch_reaches_and_a_one_element_loss_merge_as_the_model_gives_them(cls) -> None:
    """A weight's squared norm is the same in every micro-batch: it comes back once, not summed over them; a
    ``[1]`` loss comes back ``[1]``, averaged; a per-row ``[b, 1, 1]`` output still concatenates."""
    torch.manual_seed(0)
    model = _Extras().double()
    ref = copy.deepcopy(model)
    x, t = _data()
    pipe = pipeline(model, 4, (x, t))
    assert pipe.output_reductions == ["mean", "same", "same", None]
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=4)
    got, want = lp.step(x, t), ref(x, t)
    want["loss"].sum().backward()
    for key in ("loss", "l2", "w", "rows"):
        assert got[key].shape == want[key].shape, key
        assert torch.allclose(got[key], want[key].detach(), atol=1e-12, rtol=0), key
    grads = lp.named_grads()
    for n, p in ref.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-12, rtol=0), n


class _Shapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = torch.tanh(self.a(x))
        pipe_split()
        o = self.b(h)
        return o, h.mean(0), h.sum(0), self.b.weight * 2


@pytest.mark.parametrize("cls", [ScheduleGPipe, Schedule1F1B])
def test_outputs_without_a_leading_batch_dim_come_back_as_the_model_gives_them(cls) -> None:
    """A batch mean / sum of a hidden state, a weight: each merges into the model's own value and shape (the mean,
    the sum, once) instead of concatenating along dim 0."""
    torch.manual_seed(0)
    model = _Shapes().double()
    x = torch.randn(8, 3, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 4, (x,))
    assert pipe.output_reductions == [None, "mean", "sum", "same"]
    want = model(x)
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=4, loss_fn=lambda out, y: F.mse_loss(out[0], y))
    for got in (lp.eval(x), lp.step(x, target=torch.zeros(8, 3, dtype=torch.float64)), pipe(x)):
        assert len(got) == len(want)
        for k, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape and torch.allclose(g, w.detach(), atol=1e-12), k


class _Coincide(nn.Module):
    """Outputs whose sizes coincide with the micro-batch's (2 rows): two stacked heads, a broadcast copy, ones built
    from the batch's shape; each is batched and must concatenate."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.h1, self.h2 = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.a(x)
        pipe_split()
        return (torch.stack([self.h1(h), self.h2(h)]).mean(0), torch.ones(x.shape[0], 1, dtype=x.dtype),
                h.unsqueeze(0).expand(2, -1, -1).sum(0))


def test_sizes_that_coincide_with_the_micro_batch_do_not_pass_for_the_batch() -> None:
    torch.manual_seed(0)
    model = _Coincide().double()
    x = torch.randn(8, 3, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 4, (x,))
    assert pipe.output_reductions is None
    lp = LocalPipeline(pipe, ScheduleGPipe, num_ranks=2, n_microbatches=4)
    for got in (lp.eval(x), pipe(x)):
        for k, (g, w) in enumerate(zip(got, model(x))):
            assert g.shape == w.shape and torch.allclose(g, w.detach(), atol=1e-12), k


def test_a_dynamic_sequence_keeps_the_static_batch_readable() -> None:
    """``dynamic_shapes`` on the sequence only: the batch dim is static, so ``sum / x.shape[0]`` still reads as a
    mean and a per-token sum (``h.transpose(0, 1).sum(0)``) stays batched."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = self.a(x)
            pipe_split()
            h = self.b(h)
            return {"pooled": h.transpose(0, 1).sum(0), "loss": (h**2).sum() / x.shape[0]}

    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(8, 6, 4, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 4, (x,), dynamic_shapes={"x": {1: (2, 64)}})
    assert pipe.output_reductions == [None, "mean"]
    ref = copy.deepcopy(model)
    want = ref(x)
    want["loss"].backward()
    lp = LocalPipeline(pipe, ScheduleGPipe, num_ranks=2, n_microbatches=4)
    got = lp.step(x)
    for key in ("pooled", "loss"):
        assert torch.allclose(got[key], want[key].detach(), atol=1e-12), key
    for n, p in ref.named_parameters():
        assert torch.allclose(lp.named_grads()[n], p.grad, atol=1e-12), n


class _Counts(nn.Module):
    """Returns, beside its output, numbers read off the batch (rows, elements, the second dim), a literal and a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[Any, ...]:
        h = self.a(x)
        pipe_split()
        return self.b(h), x.shape[0], x.numel(), x.shape[1], 2, True


def test_numbers_counted_from_the_batch_add_up_and_others_come_back_as_given() -> None:
    """``x.shape[0]`` and ``x.numel()`` are baked into the trace as one micro-batch's numbers; returned, they add up
    over micro-batches to the batch's own. ``x.shape[1]``, a literal and a flag stay as the model gives them."""
    torch.manual_seed(0)
    model = _Counts().double()
    x = torch.randn(8, 4, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 4, (x,))
    assert pipe.output_reductions == [None, "sum", "sum", None, None, None]
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=lambda out, y: F.mse_loss(out[0], y))
    want = model(x)
    for got in (lp.eval(x), lp.step(x, target=torch.zeros(8, 2, dtype=torch.float64)), pipe(x)):
        assert torch.allclose(got[0], want[0].detach(), atol=1e-12)
        assert tuple(got[1:]) == (8, 32, 4, 2, True)


def test_counts_of_a_dynamic_batch_add_up_at_every_size() -> None:
    """Traced with dynamic sizes, ``x.shape[0]`` and ``x.numel()`` are symbols: twice the batch, twice the value, so
    they add up over micro-batches at any batch size; ``x.shape[1]`` (the sequence) comes back as it is."""
    torch.manual_seed(0)
    model = _Counts().double()
    x = torch.randn(8, 5, 4, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 4, (x,), dynamic_shapes="auto")
    assert pipe.output_reductions == [None, "sum", "sum", None, None, None]
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=lambda out, y: F.mse_loss(out[0], y))
    for xb in (x, torch.randn(12, 7, 4, dtype=torch.float64)):
        for got in (lp.eval(xb), lp.step(xb, target=torch.zeros(*xb.shape[:2], 2, dtype=torch.float64))):
            assert tuple(got[1:]) == (xb.shape[0], xb.numel(), xb.shape[1], 2, True)


def test_numbers_derived_from_the_batch_size_are_named_and_counts_add_up() -> None:
    """``B * 2 + 1`` cannot be rebuilt from micro-batches (warned); ``3 * B`` adds up; a literal stays."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> tuple[Any, ...]:
            h = self.a(x)
            pipe_split()
            rows = x.shape[0]
            return self.b(h), rows * 2 + 1, 3 * rows, 7, torch.tensor(rows), torch.tensor(rows * 2 + 1), torch.ones(3)

    x = torch.randn(8, 4)
    with pytest.warns(UserWarning, match=r"outputs 1 \(5 on one micro-batch\), 5 \(5.0 on one micro-batch\) are "
                                         r"numbers the trace computed from the batch size"):
        pipe = pipeline(Net(), 4, (x,))
    assert pipe.output_reductions == [None, "derived", "sum", None, "sum", "derived", "same"]
    out = LocalPipeline(pipe, ScheduleGPipe, num_ranks=2, n_microbatches=4).eval(x)
    assert out[2:4] == (24, 7) and torch.equal(out[4], torch.tensor(8))  # counts add up: the whole batch's
    assert torch.equal(out[6], torch.ones(3))

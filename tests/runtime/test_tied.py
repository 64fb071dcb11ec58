"""Tied weights across stages, both modes: replicate (copies + summed grads) and transmit (one owner, sent along)."""

from __future__ import annotations

import copy

import pytest
import torch
from models import gpt2, lm_loss, mse, train_steps
from torch import nn

import pippy
from pippy import SplitPoint, pipe_split, pipeline
from pippy.runtime.local import LocalPipeline


class TiedEnds(nn.Module):
    """First and last layers share one weight across 3 stages (an autoencoder-style tie)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.first = nn.Linear(d, d, bias=False)
        self.mid = nn.Linear(d, d)
        self.last = nn.Linear(d, d, bias=False)
        self.last.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        pipe_split()
        h = torch.tanh(self.mid(h))
        pipe_split()
        return self.last(h)


def _train(lp: LocalPipeline, x, y, steps: int) -> None:
    opts = [torch.optim.SGD(list(st.parameters()), lr=0.1) for st in lp.stages if list(st.parameters())]
    train_steps(lp, opts, steps, x, y)


@pytest.mark.parametrize("mode", ["replicate", "transmit"])
@pytest.mark.parametrize("sched", [pippy.Schedule1F1B, pippy.ScheduleZBH1], ids=["1f1b", "zb_h1"])
def test_tied_first_last_three_stages_train_like_plain(mode: str, sched) -> None:
    torch.manual_seed(0)
    model = TiedEnds().double()
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    pipe = pipeline(model, 4, (x,), tied_weights=mode)
    if mode == "transmit":
        assert not pipe.shared and "last.weight" not in pipe.get_stage_module(2).state_dict()
    else:
        assert [sp.stages for sp in pipe.shared] == [(0, 2)]
    lp = LocalPipeline(pipe, sched, num_ranks=3, n_microbatches=4, loss_fn=mse)
    _train(lp, x, y, 3)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        mse(ref(x), y).backward()
        opt.step()
    for st in lp.stages:
        for name, p in st.submod.named_parameters():
            assert torch.allclose(p, ref.get_parameter(name), atol=1e-12), (mode, name)


@pytest.mark.parametrize("mode", ["replicate", "transmit"])
def test_gpt2_tied_head_both_modes(mode: str) -> None:
    torch.manual_seed(0)
    model = gpt2(n_layer=2)
    ref = copy.deepcopy(model)
    x, y = torch.randint(0, 96, (4, 16)), torch.randint(0, 96, (4, 16))
    lm_loss(ref(x), y).backward()
    pipe = pipeline(model, 2, (x,), split_spec={"transformer.h.0": SplitPoint.END}, tied_weights=mode)
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=lm_loss)
    lp.step(x, target=y)
    grads = lp.named_grads()
    wte = ref.transformer.wte.weight.grad
    assert torch.allclose(grads["transformer.wte.weight"], wte, atol=1e-12)
    if mode == "replicate":
        assert torch.allclose(grads["lm_head.weight"], wte, atol=1e-12)
    else:  # one owner: stage 0 sends it along; named_grads lists that one tensor under both names
        assert not any("lm_head.weight" in dict(st.unwrapped.named_parameters()) for st in lp.stages)
        assert grads["lm_head.weight"] is grads["transformer.wte.weight"]
    for name, p in ref.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-12), name


def test_bad_tied_mode() -> None:
    with pytest.raises(ValueError, match="tied_weights must be 'replicate' or 'transmit'"):
        pipeline(TiedEnds(), 2, (torch.randn(4, 8),), tied_weights="share")


def test_tied_grads_accumulate_over_steps_without_zero_grad() -> None:
    """Two steps without zero_grad give twice one step's gradient on every tied copy."""
    torch.manual_seed(0)
    model = TiedEnds().double()
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    for _ in range(2):
        mse(ref(x), y).backward()
    lp = LocalPipeline(pipeline(model, 4, (x,)), pippy.Schedule1F1B, num_ranks=3, n_microbatches=4, loss_fn=mse)
    lp.step(x, target=y)
    lp.step(x, target=y)
    for st in lp.stages:
        for name, p in st.submod.named_parameters():
            assert torch.allclose(p.grad, ref.get_parameter(name).grad, atol=1e-12), name


@pytest.mark.parametrize("which", ["every copy", "one copy"])
def test_a_tied_weight_frozen_after_tracing_gets_no_gradient_on_any_copy(which: str) -> None:
    """The plain model has one tensor: frozen anywhere is frozen everywhere, and AdamW then leaves it alone (a copy
    given zeros instead would move under Adam's momentum and weight decay)."""
    torch.manual_seed(0)
    model = TiedEnds().double()
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    lp = LocalPipeline(pipeline(model, 4, (x,)), pippy.Schedule1F1B, num_ranks=3, n_microbatches=4, loss_fn=mse)
    opts = [torch.optim.AdamW(list(st.parameters()), lr=0.1) for st in lp.stages]
    copies = [lp.stages[0].submod.get_parameter("first.weight"), lp.stages[2].submod.get_parameter("last.weight")]
    for step in range(3):
        if step == 1:
            for p in copies if which == "every copy" else copies[:1]:
                p.requires_grad_(False)
            frozen = [p.detach().clone() for p in copies]
        for o in opts:
            o.zero_grad(set_to_none=True)
        lp.step(x, target=y)
        for o in opts:
            o.step()
    assert all(p.grad is None for p in copies)
    assert all(torch.equal(p, f) for p, f in zip(copies, frozen))
    assert lp.stages[1].submod.get_parameter("mid.weight").grad is not None


def test_a_tied_weight_no_copy_of_which_reaches_the_loss_keeps_no_gradient() -> None:
    """Both uses of a shared layer feed an output the loss ignores: its copies stay ``grad is None``."""

    class AuxTied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.aux = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.tanh(self.a(x))
            side = self.aux(h)
            pipe_split()
            return self.b(h), self.aux(side)

    torch.manual_seed(0)
    model = AuxTied().double()
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    pipe = pipeline(model, 4, (x,))
    assert [sp.stages for sp in pipe.shared] == [(0, 1), (0, 1)]
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=4,
                       loss_fn=lambda out, t: torch.nn.functional.mse_loss(out[0], t))
    lp.step(x, target=y)
    assert lp.named_grads()["aux.weight"] is None and lp.named_grads()["a.weight"] is not None


def test_named_grads_lists_a_tied_weight_under_every_name() -> None:
    """T5's ``shared.weight`` is read only as ``encoder.embed_tokens.weight``: named_grads has both names."""

    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = torch.nn.Embedding(10, 4)
            self.encoder = torch.nn.Module()
            self.encoder.embed_tokens = self.shared
            self.head = torch.nn.Linear(4, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder.embed_tokens(ids)).sum(1)

    model = Shared().double()
    ids = torch.randint(0, 10, (4, 5))
    pipe = pippy.pipeline(model, 2, (ids,), split_spec={"encoder.embed_tokens": pippy.SplitPoint.END})
    lp = LocalPipeline(pipe, pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2, loss_fn=torch.nn.functional.mse_loss)
    lp.step(ids, target=torch.zeros(4, 3, dtype=torch.float64))
    grads = lp.named_grads()
    assert grads["shared.weight"] is grads["encoder.embed_tokens.weight"] is not None

"""pippy.frontend.inline: autocast / no_grad blocks inside ``forward`` are read through (losses, buffer writes)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import assert_grads_equal
from torch import nn

from pippy import Schedule1F1B, ScheduleZBH1, SplitPoint, pipeline
from pippy.frontend.inline import inline_regions
from pippy.frontend.mutation import written_placeholders
from pippy.frontend.trace import export_module
from pippy.runtime.local import LocalPipeline


class Regions(nn.Module):
    """A loss computed inside nested regions, a buffer read in one, and (``ema``) a buffer written in one."""

    def __init__(self, reduction: str = "mean", ema: bool = False) -> None:
        super().__init__()
        self.reduction, self.ema = reduction, ema
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 5)
        self.register_buffer("scale", torch.full((5,), 0.5))
        self.register_buffer("avg", torch.zeros(8))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.ema:
            with torch.no_grad():
                self.avg.mul_(0.9).add_(h.mean(0), alpha=0.1)
        with torch.autocast("cpu", enabled=False):
            logits = self.b(h) * self.scale
            with torch.no_grad():
                target = labels.clone()
            return F.cross_entropy(logits, target, reduction=self.reduction)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(8, 4, dtype=torch.float64), torch.tensor([1, 2, -100, 4, -100, -100, 3, 0])


def test_inlined_graph_computes_the_same_and_has_no_region_calls() -> None:
    x, labels = _inputs()
    gm = export_module(Regions().double(), (x, labels)).module()
    flat = inline_regions(gm)
    assert flat is not gm
    assert not any("wrap_with" in str(n.target) for n in flat.graph.nodes)
    got = flat(x, labels)  # a plain graph module: its output tuple, not the model's pytree
    assert torch.equal(got[0] if isinstance(got, tuple) else got, gm(x, labels))
    plain = export_module(nn.Linear(4, 2), (x,)).module()
    assert inline_regions(plain) is plain


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("sched", [Schedule1F1B, ScheduleZBH1])
def test_a_loss_inside_regions_is_read_and_trained_exactly(reduction: str, sched: type) -> None:
    x, labels = _inputs()
    model = Regions(reduction).double()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe = pipeline(model, 4, (x, labels), split_spec={"a": SplitPoint.END})
        lp = LocalPipeline(pipe, sched, num_ranks=2, n_microbatches=4)
        got = lp.step(x, labels)
    assert pipe.output_reductions == [reduction]
    assert [str(w.message)[:80] for w in seen] == []  # no "cannot tell", no buffer update, no counts warning
    want = ref(x, labels)
    want.backward()
    assert float(got) == pytest.approx(float(want.detach()), rel=1e-13)
    assert_grads_equal(lp, ref)


def test_a_buffer_written_in_a_no_grad_block_is_still_warned_about() -> None:
    x, labels = _inputs()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipeline(Regions(ema=True).double(), 4, (x, labels), split_spec={"a": SplitPoint.END})
    assert any("updates the buffers avg" in str(w.message) for w in seen)


def test_an_input_only_read_inside_a_region_is_not_written() -> None:
    class Read(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                y = x * 2
            return x + y

    class Write(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                x.mul_(2)
            return x + 1

    x = torch.randn(2, 3)
    assert written_placeholders(pipeline(Read(), 1, (x,)).get_stage_module(0)) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert written_placeholders(pipeline(Write(), 1, (x.clone(),)).get_stage_module(0)) == [0]

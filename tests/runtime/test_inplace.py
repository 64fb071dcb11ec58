"""In-place ops stay transparent: on a parameterized op's output (split backward's taps), on a stage's received input."""

from __future__ import annotations

import copy

import pytest
import torch
from models import mse
from torch import nn

import pippy
from pippy import SplitPoint, pipe_split, pipeline
from pippy.frontend.mutation import written_after, written_placeholders
from pippy.runtime.local import LocalPipeline
from pippy.runtime.wgrad import WeightGradTaps

W = 8


class ReluInplace(nn.Module):
    """Linear -> ReLU(inplace) chains: every linear's output is overwritten by the ReLU after it."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(4):
            layers += [nn.Linear(W, W), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Writes(nn.Module):
    """Writes through views and with parameters; stage 1 and 2 write into the value they received."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(W, W) for _ in range(4))
        self.norm = nn.LayerNorm(W)
        self.scale = nn.Parameter(torch.full((W,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y[:, :3] = 0  # a write through a view of a linear's output
        pipe_split()
        y.mul_(self.scale)  # a received input written in place, by an op that reads a parameter
        z = self.norm(self.b(y))
        z += 1  # a layer_norm's output written in place
        pipe_split()
        z.mul_(2)
        w = self.c(z)
        w.add_(torch.tanh(w.detach()))
        pipe_split()
        return self.d(torch.relu(w))


MODELS = {"relu_inplace": ReluInplace, "writes": Writes}
CASES = [
    (pippy.Schedule1F1B, 4, 1),
    (pippy.ScheduleZBH1, 4, 1),
    (pippy.ScheduleZBH1, 2, 2),
    (pippy.ScheduleZBV, 2, 2),
    (pippy.ScheduleDualPipeV, 2, 2),
]


def _pipe(model: nn.Module, x: torch.Tensor) -> pippy.Pipe:
    """4 stages; ReluInplace's stages 1 and 3 start with the ReLU(inplace) on what they receive."""
    if isinstance(model, ReluInplace):
        return pipeline(model, 4, (x,), split_spec={c: SplitPoint.END for c in ("net.0", "net.3", "net.4")})
    return pipeline(model, 4, (x,))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(("cls", "ranks", "per_rank"), CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_in_place_writes_are_transparent(name, cls, ranks, per_rank) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().double()
    x, y = torch.randn(8, W, dtype=torch.float64), torch.randn(8, W, dtype=torch.float64)
    ref = copy.deepcopy(model)
    out = ref(x)
    mse(out, y).backward()
    pipe = _pipe(copy.deepcopy(model), x)
    assert pipe.num_stages == ranks * per_rank
    lp = LocalPipeline(pipe, cls, num_ranks=ranks, n_microbatches=4, loss_fn=mse)
    got = lp.step(x, target=y)
    assert torch.allclose(got, out, atol=1e-12)
    grads = lp.named_grads()
    for n, p in ref.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-12), n
    assert torch.allclose(lp.eval(x), out, atol=1e-12)


def test_closed_form_taps_skip_outputs_written_later() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, W)
    gm = pipeline(ReluInplace(), 1, (x,)).get_stage_module(0)
    taps = WeightGradTaps(gm)
    # the three linears followed by ReLU(inplace) lose the closed form; the last keeps it
    assert [f is not None for f in taps.forms] == [False, False, False, True]


def test_written_after_follows_views_and_order() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(W, W), nn.Linear(W, W)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.relu_()  # written before a reads it
            h = self.a(x)
            v = h.view(-1)
            out = self.b(h)
            v.add_(1)  # h written through a view, after b read it
            return out + h

    gm = pipeline(Net(), 1, (torch.randn(2, W),)).get_stage_module(0)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert written_placeholders(gm) == [0]
    assert written_after(nodes["linear"])
    assert written_after(nodes["linear"], after=nodes["linear_1"])
    assert not written_after(nodes["linear_1"])
    relu = next(n for n in gm.graph.nodes if "relu" in n.name)
    assert not written_after(nodes["x"], after=relu)  # the only write comes before a's read

"""torch.export's "tensor attributes ... assigned during export" warning: dropped for an RNN's _flat_weights only."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from pippy import SplitPoint, pipeline
from pippy.frontend.trace import export_module


class Rnns(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnns = nn.ModuleList([nn.LSTM(4, 6, num_layers=2, batch_first=True), nn.GRU(6, 4, batch_first=True)])
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for rnn in self.rnns:
            x = rnn(x)[0]
        return self.head(x)


class KeepsLast(nn.Module):
    """Assigns a plain tensor attribute in forward: torch.export's warning about it stays."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = x * 2
        return self.lin(x)


def test_rnn_flat_weights_warning_is_dropped() -> None:
    torch.manual_seed(0)
    model = Rnns().double()
    x = torch.randn(4, 5, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe = pipeline(model, 2, (x,), split_spec={"rnns.0": SplitPoint.END})
    assert pipe.num_stages == 2
    assert not [str(w.message) for w in seen if "assigned during export" in str(w.message)]
    torch.testing.assert_close(pipe(x)[0], model(x), rtol=0, atol=1e-13)


def test_other_tensor_attributes_assigned_during_export_still_warn() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        export_module(KeepsLast(), (torch.randn(2, 4),))
    said = [str(w.message) for w in seen if "assigned during export" in str(w.message)]
    assert len(said) == 1 and "self.last" in said[0], said

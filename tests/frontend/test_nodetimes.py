"""Per-node timing for ``autosplit(cost="time")``: a stall of the machine lands in one pass's samples, not in all."""

from __future__ import annotations

import types

import pytest
import torch

from pippy.frontend import nodetimes
from pippy.frontend.trace import export_module


class _Clock:
    """A clock that moves 10 µs per reading, and 50 ms per reading during one stretch of readings (a stall)."""

    def __init__(self, stall: range) -> None:
        self.now, self.calls, self.stall = 0.0, 0, stall

    def perf_counter(self) -> float:
        self.calls += 1
        self.now += 0.05 if self.calls in self.stall else 1e-5
        return self.now


def test_a_stall_during_one_pass_does_not_set_a_nodes_time(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 8)
    net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(4)])
    gm = export_module(net, (x,)).module()
    clock = _Clock(range(3, 13))  # ten readings in a row, early in the first forward pass
    monkeypatch.setattr(nodetimes, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    times = nodetimes.measure_node_times(gm, [x], repeats=5)
    assert times and max(times.values()) < 0.01, {n.name: t for n, t in times.items()}  # one stalled sample of 5

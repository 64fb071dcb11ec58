"""One activation counter: the profiler's act_bytes and the runtime's live bytes count the same storages."""

from __future__ import annotations

import torch

import pippy
from pippy import SplitPoint, pipeline
from pippy.sim.memory import SavedBytes


def test_profile_and_runtime_count_the_same_bytes() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    pipe = pipeline(net, 2, example_args=(x,), split_spec={"2": SplitPoint.BEGINNING})
    costs = pippy.profile(pipe, (x,), repeats=1, warmup=0)
    for s in range(2):
        stage = pipe.build_stage(s, "cpu")
        stage.measure_activations = True
        ins = [x[:4]] if s == 0 else [torch.randn(4, 32)]
        stage.forward(0, ins, training=True)
        assert stage.live_activation_bytes() == costs.stages[s].act_bytes > 0, s


def test_parameters_and_repeated_storages_count_once_or_not_at_all() -> None:
    w = torch.nn.Parameter(torch.ones(4, 4))
    x = torch.ones(2, 4)
    with SavedBytes(skip=[w]) as c:
        h = x @ w  # saves x (w skipped)
        _ = h * h  # saves h twice: one storage
    assert c.total == 2 * 4 * 4 + 2 * 4 * 4

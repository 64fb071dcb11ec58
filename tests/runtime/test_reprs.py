"""Short one-line reprs for schedules, LocalPipeline and simulation objects, whatever the size."""

from __future__ import annotations

import torch
from torch import nn

import pippy
from pippy import pipe_split, pipeline
from pippy.runtime.local import LocalPipeline
from pippy.schedules.generators import one_f_one_b
from pippy.sim.cost import CostModel
from pippy.sim.simulate import simulate
from pippy.sim.synthesize import synthesize


class Four(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < 3:
                pipe_split()
        return x


def test_runtime_schedules_and_local_pipeline_have_a_one_line_repr() -> None:
    pipe = pipeline(Four(), 4, (torch.ones(8, 4),))
    for cls, ranks, held in [(pippy.Schedule1F1B, 4, "[1]"), (pippy.ScheduleInterleaved1F1B, 2, "[1, 3]")]:
        lp = LocalPipeline(pipe, cls, num_ranks=ranks, n_microbatches=4, loss_fn=nn.functional.mse_loss)
        text = repr(lp.schedules[1])
        assert text == f"{cls.__name__}(rank 1 of {ranks}, stages {held}, n_microbatches=4, loss_fn=mse_loss, steps=0)"
        assert repr(lp) == f"LocalPipeline({cls.__name__}, {ranks} ranks, 4 stages, n_microbatches=4, loss_fn=mse_loss)"


def test_large_schedules_and_results_have_a_capped_repr() -> None:
    big = one_f_one_b(8, 32)
    assert len(repr(big)) < 200 and "512 actions" in repr(big) and len(str(big)) > 2000
    assert len(repr(simulate(big, CostModel.uniform(8)))) < 300
    assert len(repr(CostModel.uniform(64))) < 500
    synth = synthesize(4, 8, CostModel.uniform(4))
    assert len(repr(synth)) < 400 and repr(synth).startswith("Synthesis(rule=")

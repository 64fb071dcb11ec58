"""Copies of stage modules (``copy.deepcopy``, ``torch.save`` / ``torch.load``) keep non-persistent buffers out of state_dict."""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

from pippy import SplitPoint, pipeline


class Scaled(nn.Module):
    """Non-persistent buffers on the root and in a submodule, read by both stages."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(8, 8), nn.Linear(8, 3)
        self.register_buffer("npscale", torch.rand(8), persistent=False)
        self.inp.register_buffer("shift", torch.rand(8), persistent=False)
        self.register_buffer("kept", torch.rand(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x) + self.inp.shift) * self.npscale
        return self.out(h * self.npscale + self.kept)


def _reloaded(module: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_copies_of_stage_modules_keep_non_persistent_buffers_non_persistent() -> None:
    torch.manual_seed(0)
    model = Scaled()
    pipe = pipeline(model, 2, (torch.randn(8, 8),), split_spec={"inp": SplitPoint.END})
    for i in range(2):
        stage = pipe.build_stage(i, "cpu")
        keys = sorted(stage.submod.state_dict())
        assert set(keys) <= set(model.state_dict()) and "npscale" not in keys
        assert sorted(copy.deepcopy(stage.submod).state_dict()) == keys
        assert sorted(_reloaded(stage.submod).state_dict()) == keys
        assert sorted(copy.deepcopy(pipe.get_stage_module(i)).state_dict()) == sorted(pipe.get_stage_module(i).state_dict())
    x = torch.randn(8, 8)
    copied = copy.deepcopy(pipe.build_stage(0, "cpu").submod)
    assert torch.equal(copied(x)[0], pipe.build_stage(0, "cpu").submod(x)[0])

"""Input-only values (masks) are rebuilt in the consuming stage when that sends fewer bytes."""

from __future__ import annotations

import copy

import torch
from models import gpt2, mse
from torch import nn

import pippy
from pippy import SplitPoint, pipe_split, pipeline
from pippy.runtime.local import LocalPipeline


class MaskedNet(nn.Module):
    """Builds a [b, s, s] mask from token ids in stage 0 and uses it in stage 1; also a small input summary."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.lin = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0)[:, None, :] & (ids != 0)[:, :, None]  # [b, s, s] from [b, s]
        summary = feats.sum(-1, keepdim=True)  # [b, 1] from [b, 64]: cheaper to send than to rebuild
        h = self.emb(ids)
        pipe_split()
        att = torch.where(mask, 1.0, 0.0).to(h.dtype) @ h
        return self.lin(att).sum(1) + summary


def test_mask_is_rebuilt_summary_is_sent() -> None:
    ids = torch.randint(0, 16, (4, 12))
    feats = torch.randn(4, 64)
    pipe = pipeline(MaskedNet(), 2, (ids, feats))
    edges = [(pipe.stage_infos[0].output_names[j], m.dtype) for j, m in enumerate(pipe.stage_infos[0].outputs)]
    names = [n for n, _ in edges]
    assert "ids" in names  # the ids travel (2x12 int64), not the 2x12x12 mask
    assert all(d != torch.bool for _, d in edges)
    assert "feats" not in names  # the [2, 1] summary is sent, not the [2, 64] features


def test_rebuilt_mask_stays_transparent() -> None:
    torch.manual_seed(0)
    model = MaskedNet().double()
    ref = copy.deepcopy(model)
    ids, feats = torch.randint(0, 16, (4, 12)), torch.randn(4, 64, dtype=torch.float64)
    y = torch.randn(4, 8, dtype=torch.float64)
    mse(ref(ids, feats), y).backward()
    lp = LocalPipeline(pipeline(model, 2, (ids, feats)), pippy.Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=mse)
    lp.step(ids, feats, target=y)
    for name, p in ref.named_parameters():
        assert torch.allclose(lp.named_grads()[name], p.grad, atol=1e-12), name


def test_gpt2_sends_only_hidden_states() -> None:
    model = gpt2(n_layer=2)
    pipe = pipeline(model, 2, (torch.randint(0, 96, (4, 16)),), split_spec={"transformer.h.0": SplitPoint.END})
    outs = pipe.stage_infos[0].outputs
    assert len(outs) == 1 and outs[0].dtype == torch.float64 and outs[0].requires_grad
    off = pipeline(gpt2(n_layer=2), 2, (torch.randint(0, 96, (4, 16)),),
                   split_spec={"transformer.h.0": SplitPoint.END}, recompute_inputs=False)
    assert len(off.stage_infos[0].outputs) == 2  # the causal mask travels when rebuilding is off

"""Embedding options stages or micro-batches would change (sparse grads across stages, scale_grad_by_freq,
max_norm renorm of a weight several stages read) are refused or named; in one stage they stay exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pippy import Schedule1F1B, pipe_split, pipeline
from pippy.frontend.trace import PipeTraceError
from pippy.runtime.local import LocalPipeline


class TiedLM(nn.Module):
    def __init__(self, tied: bool = True, bag: bool = False, **emb: object) -> None:
        super().__init__()
        self.tied = tied
        self.emb = nn.EmbeddingBag(20, 8, mode="sum", **emb) if bag else nn.Embedding(20, 8, **emb)  # type: ignore[arg-type]
        self.l1, self.l2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 20)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(self.emb(ids)))
        pipe_split()
        h = torch.tanh(self.l2(h))
        return F.linear(h, self.emb.weight) if self.tied else self.head(h)


def _ce(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, 20), tgt.reshape(-1))


IDS = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied_weights", ["replicate", "transmit"])
def test_a_weight_written_in_forward_and_read_by_two_stages_is_refused(tied_weights: str) -> None:
    with pytest.raises(PipeTraceError, match=r"forward writes parameter emb.weight in place .*max_norm.* stages \[0, 1\]"):
        pipeline(TiedLM(max_norm=1.0), 2, (IDS,), tied_weights=tied_weights)


@pytest.mark.parametrize("bag", [False, True])
def test_sparse_weight_read_by_two_stages_is_refused(bag: bool) -> None:
    """nn.EmbeddingBag too (its lookup is another op: it crashed in the tied-gradient sum at the first step)."""
    with pytest.raises(PipeTraceError, match=r"emb.weight has sparse gradients .* stages \[0, 1\] read it"):
        pipeline(TiedLM(sparse=True, bag=bag), 2, (IDS,))


@pytest.mark.parametrize("bag", [False, True])
def test_scale_grad_by_freq_warns_with_several_micro_batches(bag: bool) -> None:
    """nn.EmbeddingBag too (it trained silently off by 1.1e-2)."""
    with pytest.warns(UserWarning, match=r"emb.weight has scale_grad_by_freq=True: each micro-batch"):
        pipeline(TiedLM(tied=False, scale_grad_by_freq=True, bag=bag), 2, (IDS,))


@pytest.mark.parametrize("emb", [dict(max_norm=1.0), dict(sparse=True)])
def test_in_one_stage_they_stay_exact(emb: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = TiedLM(tied=False, **emb).double()
    with torch.no_grad():
        model.emb.weight.mul_(3)
    tgt = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    lp = LocalPipeline(pipeline(model, 2, (IDS,)), Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=_ce)
    out = lp.step(IDS, target=tgt)
    ref_out = ref(IDS)
    _ce(ref_out, tgt).backward()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    grads = lp.named_grads()
    for name, p in ref.named_parameters():
        g = grads[name].to_dense() if grads[name].is_sparse else grads[name]
        torch.testing.assert_close(g, p.grad.to_dense(), rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")

"""Hugging Face models trained on their own loss (``labels=``) with ``-100`` padding that differs between
micro-batches: gradients and the merged loss equal the plain model's (pippy.runtime.ownscale)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from pippy import Schedule1F1B, ScheduleZBH1, SplitPoint, pipeline
from pippy.runtime.local import LocalPipeline

transformers = pytest.importorskip("transformers")


def _bert() -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(cfg)


def _gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


# GPT-2's loss upcasts its logits with .float(): float32 there, whatever the model's dtype
CASES = {"bert": (_bert, "bert.encoder.layer.0", 1e-12), "gpt2": (_gpt2, "transformer.h.0", 2e-6)}


@pytest.mark.parametrize("sched", [Schedule1F1B, ScheduleZBH1])
@pytest.mark.parametrize("name", sorted(CASES))
def test_own_loss_with_uneven_padding_is_exact(name: str, sched: type) -> None:
    make, cut, tol = CASES[name]
    torch.manual_seed(0)
    model = make().double()
    ids = torch.randint(0, 50, (4, 8))
    labels = ids.clone()
    labels[0, :6] = -100  # a masked prompt (causal LM) / unmasked tokens (MLM): 2 and 8 counted rows
    labels[3, ::2] = -100
    ref = copy.deepcopy(model)
    want = ref(input_ids=ids, labels=labels).loss
    want.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = pipeline(model, 2, example_kwargs={"input_ids": ids, "labels": labels},
                        split_spec={cut: SplitPoint.END})
    lp = LocalPipeline(pipe, sched, num_ranks=2, n_microbatches=2)
    got = lp.step(input_ids=ids, labels=labels)
    assert float(got.loss) == pytest.approx(float(want), rel=tol)
    grads = dict(lp.named_grads())
    scale = max(float(p.grad.abs().max()) for p in ref.parameters() if p.grad is not None)
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=tol * 10, atol=tol * scale, msg=n)

"""Checkpoint round trip: train pipelined, save per stage, merge into the unpipelined model (strict), load back."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pippy import Schedule1F1B, ScheduleInterleaved1F1B, SplitPoint, checkpoint, pipeline
from pippy.runtime.local import LocalPipeline

pytest.importorskip("transformers")
import transformers as T

GPT2 = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, use_cache=False, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
          dropout_rate=0.0, use_cache=False, decoder_start_token_id=0, pad_token_id=0)


def _train(name: str, steps: int = 3) -> tuple[torch.nn.Module, torch.nn.Module, LocalPipeline, torch.Tensor]:
    """Train ``steps`` Adam steps pipelined and unpipelined from the same init; return (ref, model, lp, ids)."""
    torch.manual_seed(0)
    if name == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(**GPT2)).double().eval()
        spec, cls = {"transformer.h.0": SplitPoint.END}, Schedule1F1B
    else:
        model = T.T5ForConditionalGeneration(T.T5Config(**T5)).double().eval()
        spec = {"encoder.block.0": SplitPoint.END, "encoder.block.1": SplitPoint.END, "decoder.block.0": SplitPoint.END}
        cls = ScheduleInterleaved1F1B
    ids = torch.randint(1, 64, (4, 8))
    ref = copy.deepcopy(model)
    pipe = pipeline(model, 4, (ids,), {"labels": ids}, split_spec=spec)
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=4)
    opts = [torch.optim.Adam(st.parameters(), lr=1e-2) for st in lp.stages]  # one optimizer per stage
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for _ in range(steps):
        for o in (*opts, ref_opt):
            o.zero_grad()
        lp.step(ids, labels=ids)
        ref(ids, labels=ids).loss.backward()
        for o in (*opts, ref_opt):
            o.step()
    return ref, model, lp, ids


@pytest.mark.parametrize(("name", "fmt"), [("gpt2", "torch"), ("gpt2", "dcp"), ("t5", "dcp")])
def test_train_save_merge_load(tmp_path: Path, name: str, fmt: str) -> None:
    ref, model, lp, _ids = _train(name)
    checkpoint.save(lp.stages, tmp_path, format=fmt, model=model)
    merged = checkpoint.merge(tmp_path, model=ref)
    fresh = copy.deepcopy(ref)
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(merged, strict=True)  # every tied alias present (lm_head.weight, shared.weight, ...)
    for n, p in ref.named_parameters(remove_duplicate=False):
        assert torch.allclose(dict(fresh.named_parameters(remove_duplicate=False))[n], p, atol=1e-10, rtol=0), n
    # load back into a fresh pipeline's stages, per stage
    before = {n: t.clone() for st in lp.stages for n, t in st.submod.state_dict().items()}
    for st in lp.stages:
        for t in st.submod.parameters():
            t.data.zero_()
    checkpoint.load(lp.stages, tmp_path, format=fmt)
    for st in lp.stages:
        for n, t in st.submod.state_dict().items():
            assert torch.equal(t, before[n]), n


def test_merge_without_model_fills_pipe_aliases_and_errors(tmp_path: Path) -> None:
    ref, _model, lp, _ = _train("gpt2", steps=1)
    checkpoint.save(lp.stages, tmp_path)
    merged = checkpoint.merge(tmp_path)
    assert torch.equal(merged["lm_head.weight"], merged["transformer.wte.weight"])
    ref.load_state_dict(merged, strict=True)
    with pytest.raises(ValueError, match="format"):
        checkpoint.save(lp.stages, tmp_path, format="zip")
    with pytest.raises(FileNotFoundError, match="pippy checkpoint"):
        checkpoint.merge(tmp_path / "nothing")

"""Hugging Face models that cannot be traced get the cause and the fix that apply to them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import transformers as T

from pippy import PipeTraceError, pipeline

V, B, L = 64, 4, 8


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trace_error(model: torch.nn.Module, **kwargs: Any) -> str:
    torch.manual_seed(0)
    with pytest.raises(PipeTraceError) as info:
        pipeline(model, 2, (torch.randint(4, V, (B, L)),), kwargs)
    return str(info.value)


def test_fsmt_failing_only_with_use_cache_off_is_not_blamed_on_the_inputs() -> None:
    cfg = T.FSMTConfig(langs=["en", "de"], src_vocab_size=V, tgt_vocab_size=V, d_model=32, encoder_layers=1,
                       decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                       decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=2,
                       decoder_start_token_id=2)
    model = T.FSMTForConditionalGeneration(cfg).double().eval()
    dec = torch.randint(4, V, (B, L))
    model(torch.randint(4, V, (B, L)), decoder_input_ids=dec)  # runs as the user calls it (use_cache on)
    msg = _trace_error(model, decoder_input_ids=dec)
    assert "inputs are the problem" not in msg
    assert "runs eagerly on these inputs as you call it, but pippy traces it with config.use_cache=False" in msg
    assert "value cannot be converted to type float without overflow" in msg
    assert "if not padding_mask.any():" in msg and "data-dependent control flow" in msg
    assert model.config.use_cache is True

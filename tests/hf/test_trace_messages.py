"""Hugging Face models that cannot be traced get the cause and the fix that apply to them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import transformers as T

from pippy import PipeTraceError, pipeline

V, B, L = 64, 4, 8


pytestmark = pytest.mark.usefixtures("one_thread")


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


def _switch() -> torch.nn.Module:
    cfg = T.SwitchTransformersConfig(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                     num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_heads=4,
                                     num_experts=4, expert_capacity=8, dropout_rate=0.0, decoder_start_token_id=0,
                                     pad_token_id=0)
    return T.SwitchTransformersForConditionalGeneration(cfg).eval()


def test_a_router_casting_itself_in_forward_is_named_not_called_data_dependent() -> None:
    inputs = {"attention_mask": torch.ones(B, L, dtype=torch.long), "decoder_input_ids": torch.randint(4, V, (B, L))}
    msg = _trace_error(_switch(), **inputs)  # float32, router_dtype float32: the cast changes nothing, still fails
    assert "Couldn't swap Linear.weight" in msg and "self.classifier = self.classifier.to(self.dtype)" in msg
    assert "forward changes a module's parameters" in msg and "take the conversion out of forward" in msg
    assert "routers (SwitchTransformersTop1Router) cast their classifier to config.router_dtype ('float32')" in msg
    assert "data-dependent control flow:" not in msg


def _mixtral(experts: str) -> torch.nn.Module:
    return T.MixtralForCausalLM(T.MixtralConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, experts_implementation=experts)).double()


def test_the_hf_experts_loop_is_named_with_batched_mm_as_fix() -> None:
    msg = _trace_error(_mixtral("eager"))
    assert "modeling_mixtral.py" in msg and "for expert_idx in expert_hit" in msg
    assert "mixture-of-experts loop over the experts its tokens were routed to" in msg
    assert 'experts_implementation="batched_mm"' in msg and 'set_experts_implementation("batched_mm")' in msg
    # the fix traces, and computes as the loop does
    torch.manual_seed(0)
    model, ids = _mixtral("eager"), torch.randint(4, V, (B, L))
    ref = model(ids).logits
    model.set_experts_implementation("batched_mm")
    assert (pipeline(model, 2, (ids,))(ids)[0] - ref).abs().max() < 1e-12

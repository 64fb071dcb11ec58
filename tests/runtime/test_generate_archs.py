"""Pipelined generation on causal LMs whose base or head forward does more than embed, layers, norm, head."""

from __future__ import annotations

import re

import pytest
import torch
import transformers as T
from gen_cases import NEW, PROMPT, hf, one_thread, prompts  # noqa: F401 - the fixture pytestmark uses

from pippy import GenerationError, generate, pipeline_for_generation
from pippy.frontend.genpipe import check_cut, plan_generation

pytestmark = pytest.mark.usefixtures("one_thread")

V = 48
LL = dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=64, vocab_size=V, eos_token_id=None, bos_token_id=None, pad_token_id=None)


def _bloom() -> T.PreTrainedModel:
    m = T.BloomForCausalLM(T.BloomConfig(vocab_size=V, hidden_size=32, n_layer=4, n_head=4, initializer_range=0.3,
                                         eos_token_id=None, bos_token_id=None, pad_token_id=None))
    with torch.no_grad():  # a trained-looking norm of the embeddings (at init it is nearly idempotent)
        m.transformer.word_embeddings_layernorm.weight.fill_(3.0)
        m.transformer.word_embeddings_layernorm.bias.fill_(0.5)
    return m


ARCHS = {
    "mpt": lambda: T.MptForCausalLM(T.MptConfig(vocab_size=V, d_model=32, n_layers=4, n_heads=4, expansion_ratio=2,
                                                max_seq_len=64)),  # final norm named norm_f
    "granite": lambda: T.GraniteForCausalLM(T.GraniteConfig(**LL, embedding_multiplier=2.0, logits_scaling=3.0,
                                                            residual_multiplier=0.5, attention_multiplier=0.3)),
    "bloom": _bloom,  # norms its embeddings inside the base forward
    "cohere": lambda: T.CohereForCausalLM(T.CohereConfig(**LL, logit_scale=0.5)),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**LL, head_dim=8, sliding_window=4, initializer_range=0.3,
                                                         final_logit_softcapping=0.5)),
    "gpt_neo": lambda: T.GPTNeoForCausalLM(T.GPTNeoConfig(  # its attention indexes the cache with layer_id
        vocab_size=V, hidden_size=32, num_layers=4, num_heads=4, attention_types=[[["global", "local"], 2]],
        window_size=4, max_position_embeddings=64, eos_token_id=None, bos_token_id=None)),
    "biogpt": lambda: T.BioGptForCausalLM(T.BioGptConfig(  # learned positions called with (mask, past, position_ids=)
        vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, eos_token_id=None, bos_token_id=None, pad_token_id=None)),
    "xglm": lambda: T.XGLMForCausalLM(T.XGLMConfig(  # sinusoidal positions called with (position_ids, past)
        vocab_size=V, d_model=32, num_layers=4, attention_heads=4, ffn_dim=64, max_position_embeddings=64,
        eos_token_id=None, bos_token_id=None, pad_token_id=None)),
    "llama4_text": lambda: T.Llama4ForCausalLM(T.Llama4TextConfig(  # base_model_prefix names no child (see _base_of)
        **{**LL, "intermediate_size_mlp": 64}, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
        interleave_moe_layer_step=2, attention_chunk_size=4)),
}
FLOAT32 = {"xglm"}  # its attention clamps with float64's min in a float32 tensor: model.generate fails in float64


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_and_sampled_tokens_equal_model_generate(arch: str) -> None:
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    model = model if arch in FLOAT32 else model.double()
    ids = prompts(4)[0]
    mask = torch.ones_like(ids)  # (left padding gives NaN logits in model.generate itself for BLOOM and Gemma 2)
    pipe = pipeline_for_generation(model, 2, max_length=PROMPT + NEW)
    stages = [pipe.build_stage(r, "cpu") for r in range(2)]
    assert torch.equal(generate(stages, ids, attention_mask=mask, max_new_tokens=NEW, progress=0), hf(model, ids, mask))
    got = generate(stages, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, seed=3, progress=0)
    assert torch.equal(got, hf(model, ids, mask, seed=3))


class _Doubled(T.LlamaForCausalLM):
    """A head forward pippy does not know about: the logits doubled."""

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_a_forward_the_cut_does_not_recreate_is_refused() -> None:
    torch.manual_seed(0)
    model = _Doubled(T.LlamaConfig(**LL)).double().eval()
    with pytest.raises(GenerationError, match=re.escape("cut stages of _Doubled give logits that differ")):
        pipeline_for_generation(model, 2)
    pipeline_for_generation(model, 2, check=False)  # the check can be skipped
    check_cut(T.LlamaForCausalLM(T.LlamaConfig(**LL)).eval(), plan_generation(model, 3))  # a plain one passes


def test_unsupported_layouts_say_where_the_layers_are() -> None:
    opt = T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))
    with pytest.raises(GenerationError, match=re.escape("its layer list sits deeper, at 'decoder.layers'")):
        pipeline_for_generation(opt, 2)

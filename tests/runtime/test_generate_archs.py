"""Pipelined generation on causal LMs whose base or head forward does more than embed, layers, norm, head."""

from __future__ import annotations

import re

import pytest
import torch
import transformers as T
from gen_cases import NEW, PROMPT, hf, one_thread, prompts  # noqa: F401 - the fixture pytestmark uses

from pippy import GenerationError, generate, pipeline_for_generation
from pippy.frontend.gencheck import check_cut
from pippy.frontend.genpipe import GenPlan, plan_generation

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
    "llama4_text": lambda: T.Llama4ForCausalLM(T.Llama4TextConfig(  # base_model_prefix names no child (see basemodule)
        **{**LL, "intermediate_size_mlp": 64}, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
        interleave_moe_layer_step=2, attention_chunk_size=4)),
    "qwen3_next": lambda: T.Qwen3NextForCausalLM(T.Qwen3NextConfig(  # linear attention: its state rides in the cache
        **LL, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=3, full_attention_interval=2, experts_implementation="batched_mm")),
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


SSM = dict(vocab_size=V, hidden_size=32, num_hidden_layers=4, max_position_embeddings=64)
MAMBA = dict(vocab_size=V, hidden_size=32, state_size=4, num_hidden_layers=4, expand=2, conv_kernel=3, time_step_rank=4)
RECURRENT = {  # layers with a recurrent state beside or instead of a KV cache
    "mamba": lambda: T.MambaForCausalLM(T.MambaConfig(**MAMBA)),
    "mamba2": lambda: T.Mamba2ForCausalLM(T.Mamba2Config(**MAMBA, num_heads=8, head_dim=8, n_groups=1, chunk_size=4)),
    "falcon_mamba": lambda: T.FalconMambaForCausalLM(T.FalconMambaConfig(**MAMBA)),
    "jamba": lambda: T.JambaForCausalLM(T.JambaConfig(
        **SSM, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, num_experts=2, num_experts_per_tok=1,
        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4,
        mamba_d_conv=3, mamba_expand=2, mamba_dt_rank=4, experts_implementation="batched_mm")),
    "bamba": lambda: T.BambaForCausalLM(T.BambaConfig(
        **SSM, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, mamba_n_heads=4, mamba_d_head=16,
        mamba_n_groups=1, mamba_d_state=4, mamba_d_conv=3, mamba_expand=2, mamba_chunk_size=4, attn_layer_indices=[1])),
    "falcon_h1": lambda: T.FalconH1ForCausalLM(T.FalconH1Config(
        **SSM, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=8, mamba_d_ssm=32,
        mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=4, mamba_d_conv=3, mamba_expand=2,
        mamba_chunk_size=4)),
    "minimax": lambda: T.MiniMaxForCausalLM(T.MiniMaxConfig(**LL, head_dim=8, num_local_experts=2,
                                                            num_experts_per_tok=1, block_size=4)),
    "rwkv": lambda: T.RwkvForCausalLM(T.RwkvConfig(vocab_size=V, hidden_size=32, num_hidden_layers=4,
                                                   attention_hidden_size=32, intermediate_size=64, context_length=64)),
}


@pytest.mark.parametrize("arch", ["rwkv", "falcon_h1"])
def test_recurrent_layers_are_refused_up_front(arch: str) -> None:
    torch.manual_seed(0)
    model = RECURRENT[arch]().eval()
    want = "keeps a recurrent state of its own" if arch == "rwkv" else "has recurrent layers (type: layer indices)"
    with pytest.raises(GenerationError, match=re.escape(want)) as info:
        pipeline_for_generation(model, 2, max_length=16)
    assert "model.generate" in str(info.value)  # says what to do instead


@pytest.mark.parametrize("arch", ["mamba", "falcon_mamba", "bamba", "minimax"])
def test_linear_attention_layers_that_the_cut_gets_wrong_are_refused_by_the_check(arch: str) -> None:
    # transformers calls these layers "linear_attention", as Qwen3-Next's; the padded check tells them apart
    torch.manual_seed(0)
    model = RECURRENT[arch]().double().eval()
    with pytest.raises(GenerationError, match=r"pipeline_for_generation: .*the 2 cut stages of .* check=False skips"):
        pipeline_for_generation(model, 2, max_length=16)


@pytest.mark.parametrize("arch", ["jamba", "mamba2"])  # Jamba: Mamba and attention layers
def test_state_space_layers_that_the_check_passes_generate_token_for_token(arch: str) -> None:
    torch.manual_seed(0)
    model = RECURRENT[arch]().double().eval()  # their state rides in the cache the stages pass along
    ids = prompts(4)[0]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left-padded rows too
    pipe = pipeline_for_generation(model, 2, max_length=PROMPT + NEW)
    stages = [pipe.build_stage(r, "cpu") for r in range(2)]
    assert torch.equal(generate(stages, ids, attention_mask=mask, max_new_tokens=NEW, progress=0), hf(model, ids, mask))


def _manual_plan(layer_attr: str, norm_attr: str) -> GenPlan:
    """A plan made without plan_generation's refusal, to run check_cut on a model it would refuse."""
    return GenPlan(num_stages=2, layers=((0, 2), (2, 4)), max_length=16, layer_attr=layer_attr, norm_attr=norm_attr,
                   eos_token_ids=(), pad_token_id=None, sampling=(1.0, 50, 1.0))


def test_check_cut_compares_a_left_padded_batch() -> None:
    # Mamba's stages match the model on one unpadded row, but not once a row is left-padded (its mixer reads the mask
    # its own way): the check must see a padded batch
    torch.manual_seed(0)
    model = T.MambaForCausalLM(T.MambaConfig(**MAMBA, initializer_range=1.0)).double().eval()
    with pytest.raises(GenerationError, match=re.escape("on a decode step of a left-padded batch")):
        check_cut(model, _manual_plan("layers", "norm_f"))


def test_an_error_inside_the_check_becomes_a_generation_error() -> None:
    torch.manual_seed(0)
    model = RECURRENT["minimax"]().eval()  # its attention refuses a DynamicCache with a ValueError
    with pytest.raises(GenerationError, match="expected the 2 cut stages of MiniMaxForCausalLM to run") as info:
        check_cut(model, _manual_plan("layers", "norm"))
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(GenerationError, match="expected the 2 cut stages of MiniMaxForCausalLM to run"):
        pipeline_for_generation(model, 2, max_length=16)  # linear attention passes the up-front check, not this one

"""Pipelined generation with every stage in this process: token for token ``model.generate``, sampling, progress, errors."""

from __future__ import annotations

import re

import pytest
import torch
from gen_cases import (
    KINDS,
    NEW,
    PROMPT,
    build,
    early_eos,
    hf,
    one_thread,  # noqa: F401 - the fixture pytestmark uses
    prompts,
)

import pippy
from pippy import GenerationError, generate, pipeline_for_generation

pytestmark = pytest.mark.usefixtures("one_thread")


def _stages(model, n: int, **kw):
    pipe = pipeline_for_generation(model, n, max_length=PROMPT + NEW, **kw)
    return [pipe.build_stage(r, "cpu") for r in range(n)]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_equals_model_generate(kind: str) -> None:
    """Left-padded prompts, EOS ids that end one group (and other rows) early; 1, 2 and 3 stages; groups 1..6."""
    ids, mask = prompts()
    eos = early_eos(kind, 2)
    model = build(kind, list(eos))
    ref = hf(model, ids, mask)
    assert torch.isin(ref[:, PROMPT:], torch.tensor(eos)).any(dim=1).sum() >= 2  # EOS really ended rows early
    for n in (1, 2, 3):
        stages = _stages(model, n)
        for groups in (1, 2, 3, 6):
            out = generate(stages, ids, attention_mask=mask, max_new_tokens=NEW, groups=groups, progress=0)
            assert torch.equal(out, ref), (kind, n, groups, out, ref)
        for in_flight in (1, 4):  # fewer groups in the pipeline at once: the same tokens
            out = generate(stages, ids, attention_mask=mask, max_new_tokens=NEW, groups=6, in_flight=in_flight,
                           progress=0)
            assert torch.equal(out, ref), (kind, n, in_flight)


def test_all_rows_stop_early_and_output_is_padded_like_model_generate() -> None:
    ids, mask = prompts()
    plain = hf(build("llama"), ids, mask)[:, PROMPT:]
    eos = sorted({int(v) for v in plain[:, 1]})  # every row ends at its second new token at the latest
    model = build("llama", eos)
    ref = hf(model, ids, mask)
    assert ref.shape[1] < PROMPT + NEW
    out = generate(_stages(model, 2), ids, attention_mask=mask, max_new_tokens=NEW, groups=3, progress=0)
    assert torch.equal(out, ref)


def test_float32_model_and_no_padding() -> None:
    model = build("qwen2").float()
    ids, _ = prompts(4)
    ref = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(generate(_stages(model, 2), ids, max_new_tokens=NEW, groups=2, progress=0), ref)
    assert torch.equal(generate(_stages(model, 2), ids, torch.ones_like(ids), max_new_tokens=NEW, progress=0), ref)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_seeded_sampling_is_reproducible_and_equals_model_generate(kind: str) -> None:
    """Same seed, same tokens; and the tokens of ``torch.manual_seed(seed); model.generate(do_sample=True)``, also
    with groups in flight and groups that stop early (their rows' draws are used up as model.generate makes them)."""
    ids, mask = prompts()
    eos = early_eos(kind, 2, 11)
    model = build(kind, list(eos))
    stages = _stages(model, 2)
    ref = hf(model, ids, mask, seed=11)
    for groups in (1, 3, 6):
        out = generate(stages, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, seed=11, groups=groups,
                       progress=0)
        assert torch.equal(out, ref), (groups, out, ref)
    other = generate(stages, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, seed=12, progress=0)
    assert not torch.equal(other, ref)


def test_temperature_top_k_top_p_equal_model_generate() -> None:
    ids, mask = prompts()
    model = build("qwen2")
    opts = {"temperature": 0.7, "top_k": 5, "top_p": 0.8}
    torch.manual_seed(3)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, **opts)
    out = generate(_stages(model, 3), ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, seed=3, groups=2,
                   progress=0, **opts)
    assert torch.equal(out, ref)


def test_progress_line_per_chunk_of_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    ids, mask = prompts()
    generate(_stages(build("gpt2"), 2), ids, attention_mask=mask, max_new_tokens=NEW, groups=2, progress=4)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [re.search(r": (\d+)/10 new tokens", x).group(1) for x in lines] == ["4", "8", "10"], lines  # type: ignore[union-attr]
    assert lines[-1].startswith("pippy.generate [stage 1, the last]") and "2/2 groups done" in lines[-1]
    assert f" {ids.shape[0] * NEW} tokens in " in lines[-1]  # no EOS: every row's every token
    generate(_stages(build("gpt2"), 2), ids, attention_mask=mask, max_new_tokens=NEW, progress=0)
    assert capsys.readouterr().err == ""


def test_progress_rate_leaves_out_padding_after_eos(capsys: pytest.CaptureFixture[str]) -> None:
    ids, mask = prompts()
    eos = early_eos("gpt2", 2)
    model = build("gpt2", list(eos))
    out = generate(_stages(model, 2), ids, attention_mask=mask, max_new_tokens=NEW, groups=2, progress=NEW)
    new = out[:, PROMPT:]
    ended = torch.isin(new, torch.tensor(eos)).int().cumsum(1)
    real = int(((ended == 0) | ((ended == 1) & torch.isin(new, torch.tensor(eos)))).sum())  # up to and with each EOS
    assert real < new.numel()  # EOS ended rows early: padding follows
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f" {real} tokens in " in line, (real, line)


def test_the_model_is_left_unchanged_and_stages_hold_their_own_layers() -> None:
    model = build("gpt2")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    stages = _stages(model, 3, layers_per_stage=[1, 2, 1])
    assert [len(s.module.base.h) for s in stages] == [1, 2, 1]
    assert [blk.attn.layer_idx for blk in stages[1].module.base.h] == [0, 1]
    assert [blk.attn.layer_idx for blk in model.transformer.h] == [0, 1, 2, 3]
    assert model.config.num_hidden_layers == 4 and model.transformer.wte is not None
    ids, mask = prompts()
    generate(stages, ids, attention_mask=mask, max_new_tokens=NEW, groups=3, progress=0)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert stages[1].module.base.wte is None and stages[1].module.head is None and stages[2].module.head is not None
    meta = pipeline_for_generation(model, 2).build_stage(1, "meta")  # another device: only this stage's modules copy
    assert next(meta.module.parameters()).device.type == "meta"
    assert next(model.parameters()).device.type == "cpu"


def test_public_names() -> None:
    assert pippy.generate is generate and pippy.pipeline_for_generation is pipeline_for_generation
    assert issubclass(pippy.GenerationError, ValueError)
    assert {"generate", "pipeline_for_generation", "GenerationError", "GenerationPipe", "GenerationStage"} <= set(
        pippy.__all__
    )


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(GenerationError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_models_without_a_kv_cache_and_bad_splits_are_refused() -> None:
    from transformers import BertConfig, BertModel, GPT2Model

    msg = _error(pipeline_for_generation, torch.nn.Linear(2, 2), 2)
    assert "expected a Hugging Face causal LM with a KV cache" in msg and "got Linear" in msg
    bert = BertModel(BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32))
    assert "got BertModel, which has no generate()" in _error(pipeline_for_generation, bert, 2)
    gpt2 = build("gpt2")
    assert "got GPT2Model" in _error(pipeline_for_generation, GPT2Model(gpt2.config), 2)
    assert "at most one stage per decoder layer, got num_stages=5" in _error(pipeline_for_generation, gpt2, 5)
    msg = _error(pipeline_for_generation, gpt2, 2, layers_per_stage=[3, 2])
    assert "summing to the model's 4 layers; got [3, 2]" in msg
    msg = _error(pipeline_for_generation, gpt2, 2, max_length=65)
    assert "max_length <= the model's max_position_embeddings (64), got 65" in msg


def test_bad_generate_input_says_what_was_expected_and_how_to_fix() -> None:
    stages = _stages(build("llama"), 2)
    ids, mask = prompts()

    def err(*args, **kw) -> str:
        return _error(generate, stages, *args, **{"max_new_tokens": NEW, "progress": 0, **kw})

    long_ids = torch.ones(6, PROMPT + NEW, dtype=torch.long)
    msg = err(long_ids)
    assert "the prompt alone is longer than the KV cache" in msg and "got 17 + 10 = 27" in msg
    assert "max_length=17" in msg and "larger max_length" in msg
    assert "prompt + max_new_tokens exceeds the KV cache" in err(ids, mask, max_new_tokens=NEW + 1)
    for bad in (0, -3):
        assert f"expected max_new_tokens >= 1, got {bad}" in err(ids, mask, max_new_tokens=bad)
    msg = err(ids, mask, groups=4)
    assert msg.startswith("pippy.generate on rank 0, stage 0: expected a batch that splits into groups=4")
    assert "got a batch of 6 prompts" in msg and "divisible by groups" in msg
    assert "attention_mask of the shape of input_ids [6, 7], got [6, 6]" in err(ids, mask[:, 1:])
    assert "at least one 1 per row" in err(ids, mask * 0)
    assert "2-D integer tensor" in err(ids.float())
    assert "expected in_flight between 1 and groups=2, got 3" in err(ids, mask, groups=2, in_flight=3)
    assert "temperature > 0" in err(ids, mask, do_sample=True, temperature=0.0)
    assert "expected all 2 stages of one pipe" in _error(generate, stages[:1] * 2, ids, max_new_tokens=2)
    assert "expected torch.distributed to be initialized" in _error(generate, stages[1], ids, max_new_tokens=2)
    assert "expected a GenerationStage" in _error(generate, "stage", ids, max_new_tokens=2)

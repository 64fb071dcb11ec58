"""Tiny causal LMs and prompts for the generation tests, and the cases each spawned rank runs."""

from __future__ import annotations

import functools
import os
import time
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist

import pippy

VOCAB, PROMPT, NEW = 48, 7, 10
KINDS = ("gpt2", "llama", "qwen2")


@pytest.fixture
def one_thread() -> Any:
    """The reference runs use tiny models: one intra-op thread is many times faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(kind: str, eos: list[int] | None = None) -> Any:
    """A 4-layer float64 causal LM with seeded random weights (the same on every rank), EOS ``eos``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "eos_token_id": eos, "bos_token_id": None, "pad_token_id": None}
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=64, **common))
    else:
        cls, cfg_cls = (LlamaForCausalLM, LlamaConfig) if kind == "llama" else (Qwen2ForCausalLM, Qwen2Config)
        model = cls(cfg_cls(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64, **common))
    return model.double().eval()


def prompts(batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths ``[batch, PROMPT]`` and their mask."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 1, 5, 2, 0, 4, 1][:batch]):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def hf(model: Any, ids: torch.Tensor, mask: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """``model.generate`` on the unpipelined model (greedy, or sampled after ``torch.manual_seed(seed)``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if seed is None:
            return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        torch.manual_seed(seed)
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True)


@functools.cache
def early_eos(kind: str, rows: int, seed: int | None = None) -> tuple[int, ...]:
    """EOS ids that end one group of ``rows`` rows entirely, and some rows early, yet not every row."""
    ids, mask = prompts()
    plain = hf(build(kind), ids, mask, seed)[:, PROMPT:]
    for step in range(2, NEW - 2):
        for first in range(0, plain.shape[0], rows):
            eos = tuple(sorted({int(v) for v in plain[first : first + rows, step]}))
            out = hf(build(kind, list(eos)), ids, mask, seed)[:, PROMPT:]
            ended = torch.isin(out, torch.tensor(eos)).any(dim=1)
            if bool(ended.view(-1, rows).all(dim=1).any()) and not bool(ended.all()):
                return eos
    raise AssertionError(f"no EOS ends a group of {kind} early; change the seed")


def matrix(rank: int, world: int, cases: list[tuple[str, int, int, int | None]]) -> dict[str, Any]:
    """Per (model, groups, eos, seed): pipelined output on ``world`` ranks vs ``model.generate`` (and shape)."""
    ids, mask = prompts()
    report: dict[str, Any] = {}
    for kind, groups, eos, seed in cases:
        model = build(kind, None if eos is None else list(eos))
        stage = pippy.pipeline_for_generation(model, world, max_length=PROMPT + NEW).build_stage(rank, "cpu")
        sample = {"do_sample": True, "seed": seed} if seed is not None else {}
        out = pippy.generate(stage, ids, attention_mask=mask, max_new_tokens=NEW, groups=groups, progress=4, **sample)
        ref = hf(model, ids, mask, seed)
        report[f"{kind}/g{groups}/eos{eos}/seed{seed}"] = (torch.equal(out, ref), tuple(out.shape), tuple(ref.shape))
    return report


def failures(rank: int, world: int) -> dict[str, str]:
    """Bad input raises the same clear error on every rank (no hang); a missing rank times out with a clear message."""
    ids, mask = prompts()
    model = build("llama")
    stage = pippy.pipeline_for_generation(model, world, max_length=PROMPT + NEW).build_stage(rank, "cpu")
    res: dict[str, str] = {}
    for name, kw in {"groups": {"groups": 4}, "new": {"max_new_tokens": 0}, "long": {"max_new_tokens": NEW + 1}}.items():
        args = {"max_new_tokens": NEW, **kw}
        try:
            pippy.generate(stage, ids, attention_mask=mask, progress=0, **args)
            res[name] = "no error"
        except pippy.GenerationError as exc:
            res[name] = str(exc)
    dist.barrier()
    os.environ["PIPPY_TIMEOUT"] = "2"
    start = time.monotonic()
    if rank != 0:  # rank 0 never calls generate: the others must stop within the timeout, saying who waited for what
        try:
            pippy.generate(stage, ids, attention_mask=mask, max_new_tokens=NEW, groups=2, progress=0)
            res["timeout"] = "no error"
        except pippy.PipeCommError as exc:
            res["timeout"] = str(exc)
        res["seconds"] = f"{time.monotonic() - start:.1f}"
    else:
        time.sleep(4)  # stay up past the others' timeout (a gloo wait that timed out closes the connection: no barrier)
    return res

"""The generation pipe and its per-rank stage: which layers a rank runs, on which device, in which process group.

``pipeline_for_generation(model, num_stages, max_length=...)`` is called the same way on every
rank; ``pipe.build_stage(rank, device)`` keeps only that rank's layers (with the embeddings on the
first stage, the final norm and LM head on the last). :func:`pippy.generate` then runs it.

    >>> from transformers import Qwen2Config, Qwen2ForCausalLM
    >>> cfg = Qwen2Config(num_hidden_layers=4, hidden_size=16, intermediate_size=32, num_attention_heads=2,
    ...                   num_key_value_heads=1, vocab_size=40, max_position_embeddings=64)
    >>> pipe = pipeline_for_generation(Qwen2ForCausalLM(cfg), 2, max_length=48)
    >>> stage = pipe.build_stage(1, "cpu")
    >>> stage.is_last, len(stage.module.base.layers), stage.max_length
    (True, 2, 48)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pippy.frontend.compiled import uncompiled
from pippy.frontend.gencheck import check_cut
from pippy.frontend.gencut import StageModule, cut_stage
from pippy.frontend.genpipe import GenerationError, GenPlan, plan_generation
from pippy.runtime.guards import use_cuda_device

__all__ = ["GenerationPipe", "GenerationStage", "pipeline_for_generation"]


class GenerationStage:
    """One rank's part of a :class:`GenerationPipe`: its stage module on its device, and the process group.

    Built by :meth:`GenerationPipe.build_stage`; holds no KV cache itself (each :func:`pippy.generate`
    call makes one cache per group of requests for this stage's layers, and drops them at the end).
    """

    def __init__(self, plan: GenPlan, index: int, module: StageModule, device: torch.device, group: Any) -> None:
        self.plan, self.index, self.module, self.device, self.group = plan, index, module, device, group
        self.num_stages = plan.num_stages
        self.is_first, self.is_last = index == 0, index == plan.num_stages - 1
        param = next(module.parameters())
        self.dtype = param.dtype

    @property
    def max_length(self) -> int:
        """Longest sequence (prompt + new tokens) this stage's cache may hold."""
        return self.plan.max_length

    def __repr__(self) -> str:
        lo, hi = self.plan.layers[self.index]
        return f"GenerationStage(stage {self.index} of {self.num_stages}, layers {lo}..{hi - 1}, {self.device})"


class GenerationPipe:
    """A causal LM cut into stages for pipelined generation (see :func:`pipeline_for_generation`)."""

    def __init__(self, model: nn.Module, plan: GenPlan) -> None:
        self.model, self.plan = model, plan

    def __repr__(self) -> str:
        """One line: the model's class, the stages with their decoder layers, and the cache length.

            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
            >>> pipeline_for_generation(gpt2, 2)
            GenerationPipe(GPT2LMHeadModel, 2 stages, layers [0..1, 2..2], max_length=32)
        """
        layers = ", ".join(f"{lo}..{hi - 1}" for lo, hi in self.plan.layers)
        return (f"GenerationPipe({type(self.model).__name__}, {self.num_stages} stages, layers [{layers}], "
                f"max_length={self.max_length})")

    @property
    def num_stages(self) -> int:
        """Number of stages, one per rank."""
        return self.plan.num_stages

    @property
    def max_length(self) -> int:
        """Longest sequence (prompt + new tokens) the KV caches may hold."""
        return self.plan.max_length

    def build_stage(self, rank: int, device: torch.device | str = "cpu", group: Any = None) -> GenerationStage:
        """Stage ``rank`` on ``device``; ``group`` is the pipeline's process group (``None``: the default group).

        Parameters are shared with the model when it already sits on ``device``, else only this
        stage's modules are copied there (the model is left as it is).

            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
            >>> pipeline_for_generation(gpt2, 2).build_stage(0, "cpu")
            GenerationStage(stage 0 of 2, layers 0..0, cpu)
        """
        module = cut_stage(self.model, self.plan, rank)
        dev = torch.device(device)
        if dev.type == "cuda":  # a bare "cuda" gets this process's index, made current (NCCL collectives use it)
            dev = use_cuda_device(dev, f"GenerationPipe.build_stage({rank}, {str(device)!r})", group)
        here = next(self.model.parameters()).device
        if dev != here:
            module = copy.deepcopy(module).to(dev)  # copies this stage's modules only
        return GenerationStage(self.plan, rank, module, dev, group)


def pipeline_for_generation(
    model: nn.Module, num_stages: int, *, max_length: int | None = None, layers_per_stage: Sequence[int] | None = None,
    check: bool = True,
) -> GenerationPipe:
    """Cut a Hugging Face causal LM (GPT-2, Llama, Qwen2, ...) into ``num_stages`` stages for :func:`pippy.generate`.

    Call it the same way on every rank. ``max_length`` is the longest prompt + new tokens the
    KV caches will hold (default: the model's ``max_position_embeddings``); ``layers_per_stage``
    gives the decoder layers per stage (default: an even split, the remainder on earlier stages).
    Raises :class:`pippy.GenerationError` for a model without a KV cache or a bad split, and (``check``)
    when the cut stages' logits on a short prompt and one decode step differ from the model's.

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(num_hidden_layers=4, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        ...                   num_key_value_heads=1, vocab_size=40, max_position_embeddings=64)
        >>> pipe = pipeline_for_generation(LlamaForCausalLM(cfg), 2, max_length=32, layers_per_stage=[3, 1])
        >>> pipe.plan.layers
        ((0, 3), (3, 4))
    """
    if not isinstance(model, nn.Module):
        raise GenerationError(f"pipeline_for_generation: expected an nn.Module causal LM, got {type(model).__name__}.")
    model = uncompiled(model, "pipeline_for_generation()", hint="")  # torch.compile(model): the model itself
    plan = plan_generation(model, num_stages, max_length=max_length, layers_per_stage=layers_per_stage)
    if check:
        check_cut(model, plan)
    return GenerationPipe(model, plan)

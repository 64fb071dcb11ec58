"""Cut one generation stage out of a causal LM: shallow copies of its own modules, sharing its parameters.

Stage ``i`` of a :class:`~pippy.frontend.genpipe.GenPlan` is the model's base module with only
its layers (each attention renumbered to the stage's own KV cache), the embeddings on stage 0
only, and the final norm and LM head on the last stage only (see :mod:`pippy.frontend.genpipe`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pippy.frontend.basemodule import base_module
from pippy.frontend.genpipe import _LAYER_IDS, _POSITIONS, GenerationError, GenPlan

__all__ = ["StageModule", "cut_stage"]


def _shallow(mod: nn.Module) -> nn.Module:
    """A copy of ``mod`` sharing parameters and children, whose child table can be changed independently."""
    out = copy.copy(mod)
    out._modules = dict(mod._modules)
    return out


def _numbered(mod: nn.Module) -> bool:
    return any(hasattr(m, a) for m in mod.modules() for a in _LAYER_IDS)


def _renumbered(layer: nn.Module, idx: int) -> nn.Module:
    """Shallow copies down to every submodule with a ``layer_idx`` (``layer_id``), set to ``idx`` (the stage-local
    cache index)."""
    out = _shallow(layer)
    for name, child in _children(out):
        if child is not None and _numbered(child):
            out._modules[name] = _renumbered(child, idx)
    for attr in _LAYER_IDS:
        if isinstance(getattr(out, attr, None), int):
            setattr(out, attr, idx)
    return out


def _children(mod: nn.Module) -> list[tuple[str, Any]]:
    """``(name, child)`` pairs of ``mod``'s child table, ``None`` entries included."""
    return list(mod._modules.items())


class _NoPositions(nn.Module):  # type: ignore[misc]
    """Stands in for a position embedding on later stages: adds an exact zero, whatever the base forward passes it
    (GPT-2 ``wpe(position_ids)``, BioGPT ``(attention_mask, past_length, position_ids=...)``, XGLM ``(position_ids,
    past_length)``)."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        return torch.zeros((), device=device)


class StageModule(nn.Module):  # type: ignore[misc]
    """Stage ``i`` of a causal LM for generation: token ids or hidden states in, hidden states or last logits out.

    ``forward(x, attention_mask, position_ids, cache)``: on the first stage ``x`` is ``[b, l]`` token
    ids, later ``[b, l, hidden]`` states; the last stage returns the float32 logits of the last
    position ``[b, vocab]`` (as ``model.generate`` takes them), the others hidden states
    ``[b, l, hidden]``. Two stages in a row give the model's last logits:

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from pippy.frontend.genpipe import plan_generation
        >>> gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).eval()
        >>> s0, s1 = (cut_stage(gpt2, plan_generation(gpt2, 2), i) for i in (0, 1))
        >>> ids = torch.tensor([[5, 7, 9]]); pos = torch.arange(3)[None]
        >>> hidden = s0(ids, None, pos, s0.new_cache())
        >>> logits = s1(hidden, None, pos, s1.new_cache())
        >>> hidden.shape, logits.shape, torch.allclose(logits, gpt2(ids).logits[:, -1], atol=1e-5)
        (torch.Size([1, 3, 16]), torch.Size([1, 50]), True)
    """

    def __init__(self, base: nn.Module, head: nn.Module | None, config: Any, lo: int, hi: int, first: bool,
                 logit_scale: float = 1.0, softcap: float | None = None) -> None:
        super().__init__()
        self.base, self.head = base, head
        self.first, self.last = first, head is not None
        self._config, self._lo, self._hi = config, lo, hi
        self.logit_scale, self.softcap = logit_scale, softcap  # what the *ForCausalLM forward does to the logits

    def new_cache(self) -> Any:
        """An empty KV cache for this stage's layers (Hugging Face ``DynamicCache``, layer types as the model's)."""
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self._config)
        if len(cache.layers) >= self._hi:
            cache.layers = cache.layers[self._lo : self._hi]
        return cache

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Run this stage's layers once (prefill or one decode step), updating ``cache`` in place."""
        feed = {"input_ids": x} if self.first else {"inputs_embeds": x}
        out = self.base(**feed, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True)
        hidden = out[0]  # [b, l, hidden]
        if self.head is None:
            return hidden
        logits = self.head(hidden[:, -1:])[:, -1]
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()  # [b, vocab], float32 like model.generate


def _logit_post(model: nn.Module) -> tuple[float, float | None]:
    """The scale and soft cap a causal LM's forward applies to its head's logits (Granite divides by
    ``logits_scaling``, Cohere multiplies by ``logit_scale``, Gemma 2 soft-caps)."""
    config = model.config
    scale = 1.0
    divide = getattr(config, "logits_scaling", None)
    if isinstance(divide, int | float) and divide:
        scale /= float(divide)
    mul = getattr(model, "logit_scale", None)
    if isinstance(mul, int | float) and not isinstance(mul, bool):
        scale *= float(mul)
    cap = getattr(config, "final_logit_softcapping", None)
    return scale, float(cap) if isinstance(cap, int | float) and cap else None


def cut_stage(model: nn.Module, plan: GenPlan, i: int) -> StageModule:
    """Stage ``i`` of ``model`` as ``plan`` cuts it; shares the model's parameters and changes nothing in it.

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from pippy.frontend.genpipe import plan_generation
        >>> gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
        >>> s1 = cut_stage(gpt2, plan_generation(gpt2, 2), 1)
        >>> s1.base.h[0].attn.layer_idx, gpt2.transformer.h[1].attn.layer_idx, s1.base.wte is None
        (0, 1, True)
    """
    if not 0 <= i < plan.num_stages:
        raise GenerationError(f"expected a stage index in 0..{plan.num_stages - 1}, got {i}. Pass the rank of this stage.")
    lo, hi = plan.layers[i]
    first, last = i == 0, i == plan.num_stages - 1
    src = base_module(model)
    assert src is not None, "plan_generation checked the base model"
    base = _shallow(src)
    blocks = getattr(src, plan.layer_attr)
    base._modules[plan.layer_attr] = nn.ModuleList(_renumbered(blocks[j], j - lo) for j in range(lo, hi))
    config = copy.copy(src.config)  # the stage's base model loops over num_hidden_layers and layer_types[i]
    types = getattr(config, "layer_types", None)
    if types is not None:
        try:
            config.layer_types = list(types[lo:hi])
        except AttributeError:  # a read-only property derived from other fields (check_cut compares the result)
            pass
    config.num_hidden_layers = hi - lo
    base.config = config
    if not first:
        emb = src.get_input_embeddings()
        for name, child in _children(base):
            if child is emb:
                base._modules[name] = None  # later stages take inputs_embeds; the table stays on stage 0
            elif name in _POSITIONS:
                base._modules[name] = _NoPositions()
            elif child is not None and "emb" in name.lower() and "norm" in type(child).__name__.lower():
                base._modules[name] = nn.Identity()  # BLOOM's norm of the embeddings: stage 0 applied it
        if isinstance(getattr(base, "embedding_multiplier", None), int | float):
            base.embedding_multiplier = 1.0  # Granite scales inputs_embeds: stage 0 did
    if not last and plan.norm_attr:
        base._modules[plan.norm_attr] = nn.Identity()
    head = model.get_output_embeddings() if last else None
    return StageModule(base, head, src.config, lo, hi, first, *_logit_post(model)).eval()

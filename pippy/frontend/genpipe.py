"""Plan how a Hugging Face causal LM is cut into pipeline stages for generation (the cut itself: :mod:`.gencut`).

No tracing: stage ``i`` is a shallow copy of the model's base module (``transformer`` for GPT-2,
``model`` for Llama / Qwen2) whose block list holds only its layers, each attention renumbered so
that the stage's own KV cache indexes ``0..k-1``. Stage 0 embeds token ids; later stages take the
hidden states in as ``inputs_embeds`` (GPT-2's position embedding is added on stage 0 only); the
final norm and the LM head run on the last stage only. The user's model is never changed.

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2,
    ...                   num_key_value_heads=1, vocab_size=40, max_position_embeddings=32)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> plan = plan_generation(model, 2)
    >>> plan.layers, plan.max_length
    (((0, 2), (2, 3)), 32)
    >>> ids = torch.randint(0, 40, (2, 5)); pos = torch.arange(5).expand(2, 5)
    >>> from pippy.frontend.gencut import cut_stage
    >>> s0, s1 = cut_stage(model, plan, 0), cut_stage(model, plan, 1)
    >>> c0, c1 = s0.new_cache(), s1.new_cache()
    >>> with torch.no_grad():
    ...     logits = s1(s0(ids, None, pos, c0), None, pos, c1)
    ...     full = model(ids).logits[:, -1].float()
    >>> torch.allclose(logits, full, atol=1e-5), c0.get_seq_length(), len(c1.layers)
    (True, 5, 1)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pippy.frontend.basemodule import base_module

__all__ = ["GenPlan", "GenerationError", "plan_generation"]

_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
_POSITIONS = ("wpe", "embed_positions")  # learned absolute positions added inside the base forward
_LAYER_IDS = ("layer_idx", "layer_id")  # what an attention indexes its KV cache layer with


class GenerationError(ValueError):
    """Bad input for pipelined generation: the message says what was expected, what came instead, and how to fix it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenPlan:
    """Where a causal LM is cut for generation, and the generation defaults read from the model.

        >>> GenPlan(num_stages=2, layers=((0, 1), (1, 2)), max_length=8, layer_attr="h", norm_attr="ln_f",
        ...         eos_token_ids=(0,), pad_token_id=None, sampling=(1.0, 50, 1.0)).num_stages
        2
    """

    num_stages: int
    """Number of pipeline stages (one per rank)."""
    layers: tuple[tuple[int, int], ...]
    """Per stage, the half-open range ``[lo, hi)`` of decoder layers it runs."""
    max_length: int
    """Longest sequence (prompt + new tokens) a stage's KV cache may hold."""
    layer_attr: str
    """Name of the base model's block list (``h`` for GPT-2, ``layers`` for Llama / Qwen2)."""
    norm_attr: str
    """Name of the base model's final norm (``ln_f`` or ``norm``)."""
    eos_token_ids: tuple[int, ...]
    """End-of-sequence ids from the model's generation config (empty: no early stop)."""
    pad_token_id: int | None
    """Pad id from the model's generation config (``None``: the first EOS id, as Hugging Face does)."""
    sampling: tuple[float, int, float]
    """Default ``(temperature, top_k, top_p)`` for ``do_sample=True``, resolved as ``model.generate`` does."""


def _fail(what: str) -> GenerationError:
    return GenerationError(f"pipeline_for_generation: {what}")


def _block_list(base: nn.Module) -> tuple[str, nn.ModuleList]:
    lists = [(n, m) for n, m in base.named_children() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if len(lists) != 1:
        deeper = [n for n, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and "." in n]
        where = f"; its layer list sits deeper, at {deeper[0]!r}, which pipelined generation does not cut" if deeper \
            and not lists else ""
        raise _fail(
            f"expected the base module {type(base).__name__} to hold one list of decoder layers directly (like "
            f"GPT-2's 'h' or Llama's 'layers'), found {[n for n, _ in lists] or 'none'}{where}. Supported: causal "
            "LMs built like GPT2LMHeadModel, LlamaForCausalLM or Qwen2ForCausalLM; for others run the forward "
            "pipeline (pippy.pipeline and a schedule's eval) without a KV cache."
        )
    return lists[0]


_NO_KV = ("Generate with the unpipelined model.generate, or run the forward pipeline (pippy.pipeline and a schedule's "
          "eval) without a KV cache.")


def _kv_type(layer_type: str) -> bool:
    """Whether a ``config.layer_types`` entry is a layer pipelined generation may cut: one with a key/value cache (or
    none at all), or linear attention, whose state lives in the cache object the stages pass along (Qwen3-Next;
    :func:`pippy.frontend.gencheck.check_cut`, with its left-padded rows, then decides). Mamba, convolution and
    hybrid layers are refused."""
    return layer_type in ("dummy", "moe", "mlp") or layer_type.endswith("attention")


def _refuse_recurrent(model: nn.Module, base: nn.Module) -> None:
    """Refuse a model whose layers keep a recurrent state outside the cache the stages pass along (RWKV, convolution
    and hybrid layers): each model's own generate feeds it its own way. Linear attention goes to the check."""
    name, params = type(model).__name__, inspect.signature(base.forward).parameters
    if "cache" not in params and "past_key_values" not in params:
        raise _fail(
            f"expected a causal LM whose base model takes a key/value cache (a 'cache' argument, as Llama's does), but "
            f"{type(base).__name__}.forward takes none (its arguments: {', '.join(p for p in params if p != 'self')}): "
            f"{name} keeps a recurrent state of its own, which pipelined generation cannot give each stage. {_NO_KV}"
        )
    bad: dict[str, list[int]] = {}
    for i, kind in enumerate(getattr(getattr(base, "config", model.config), "layer_types", None) or ()):
        if not _kv_type(str(kind)):
            bad.setdefault(str(kind), []).append(i)
    if bad:
        raise _fail(
            f"expected decoder layers that keep their state in the cache the stages pass along (full, sliding, "
            f"chunked or linear attention), but config.layer_types of {name} has recurrent layers (type: layer "
            f"indices) {bad}. Such a layer (a convolution, a hybrid block) carries a state that each model's own "
            "generate feeds in its own way, which the pipelined stages do not re-create, so tokens could differ from "
            f"model.generate. {_NO_KV}"
        )


def _final_norm(base: nn.Module, layer_attr: str) -> str:
    """The base module's final norm (run on the last stage only): a known name, else the one norm-like child
    that is not an embedding norm; '' when it has none."""
    known = next((n for n in _NORMS if isinstance(getattr(base, n, None), nn.Module)), "")
    if known:
        return known
    norms = [n for n, m in base.named_children() if n != layer_attr and "emb" not in n.lower()
             and "norm" in type(m).__name__.lower()]
    if len(norms) > 1:
        raise _fail(
            f"expected {type(base).__name__} to have one final norm after its layers, found several: {norms}. "
            "Pipelined generation cannot tell which one runs last."
        )
    return norms[0] if norms else ""


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        return tuple(int(v) for v in value.flatten().tolist())
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _split_layers(n: int, num_stages: int, layers_per_stage: Sequence[int] | None) -> tuple[tuple[int, int], ...]:
    if layers_per_stage is None:
        if num_stages > n:
            raise _fail(
                f"expected at most one stage per decoder layer, got num_stages={num_stages} for a model with {n} "
                "layers. Use fewer stages."
            )
        sizes = [n // num_stages + (1 if i < n % num_stages else 0) for i in range(num_stages)]
    else:
        sizes = [int(k) for k in layers_per_stage]
        if len(sizes) != num_stages or sum(sizes) != n or min(sizes) < 1:
            raise _fail(
                f"expected layers_per_stage to give {num_stages} counts, each at least 1, summing to the model's {n} "
                f"layers; got {list(layers_per_stage)}. Fix the counts, or leave layers_per_stage out for an even split."
            )
    bounds, lo = [], 0
    for k in sizes:
        bounds.append((lo, lo + k))
        lo += k
    return tuple(bounds)


def plan_generation(
    model: nn.Module, num_stages: int, *, max_length: int | None = None, layers_per_stage: Sequence[int] | None = None
) -> GenPlan:
    """Check that ``model`` is a causal LM with a KV cache and decide which layers each stage runs.

    ``max_length`` (prompt + new tokens) defaults to the model's ``max_position_embeddings``; the
    decoder layers are split evenly (earlier stages take the remainder, since the last one runs the
    LM head) unless ``layers_per_stage`` gives the counts. Raises :class:`GenerationError`.

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=5, n_embd=16, n_head=2, vocab_size=50, n_positions=64))
        >>> plan_generation(gpt2, 3, max_length=40).layers
        ((0, 2), (2, 4), (4, 5))
        >>> plan_generation(torch.nn.Linear(2, 2), 2)
        Traceback (most recent call last):
        ...
        pippy.frontend.genpipe.GenerationError: pipeline_for_generation: expected a Hugging Face causal LM with a KV cache (GPT-2, Llama, Qwen2 and alike), got Linear, which has no generate(). Build the model with e.g. AutoModelForCausalLM.from_config(config).
    """
    name = type(model).__name__
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        raise _fail(
            f"expected a Hugging Face causal LM with a KV cache (GPT-2, Llama, Qwen2 and alike), got {name}, which has "
            "no generate(). Build the model with e.g. AutoModelForCausalLM.from_config(config)."
        )
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise _fail(f"expected a decoder-only causal LM, got the encoder-decoder {name}; only decoder-only models are supported.")
    base = base_module(model)
    if base is None or model.get_output_embeddings() is None:
        raise _fail(
            f"expected a causal LM with a base model (a child holding the decoder layer list) and an LM head, got "
            f"{name}{'' if base else ', which has no such child'}. Use its *ForCausalLM class."
        )
    _refuse_recurrent(model, base)
    layer_attr, blocks = _block_list(base)
    if not any(hasattr(m, a) for m in blocks[0].modules() for a in _LAYER_IDS):
        raise _fail(
            f"expected {name}'s decoder layers to index a KV cache by layer (an attention module with a layer_idx "
            f"or layer_id), but {type(blocks[0]).__name__} has none, so pipelined generation cannot give each stage "
            "its own cache. Run the forward pipeline (pippy.pipeline and a schedule's eval) without a KV cache."
        )
    norm_attr = _final_norm(base, layer_attr)
    if num_stages < 1:
        raise _fail(f"expected num_stages >= 1, got {num_stages}.")
    layers = _split_layers(len(blocks), num_stages, layers_per_stage)
    limit = getattr(config, "max_position_embeddings", None)
    if max_length is None:
        max_length = limit
    if max_length is None or max_length < 2:
        raise _fail(f"expected max_length >= 2 (prompt + new tokens), got {max_length}. Pass max_length=...")
    if limit is not None and max_length > limit:
        raise _fail(
            f"expected max_length <= the model's max_position_embeddings ({limit}), got {max_length}. "
            f"Lower max_length to at most {limit}."
        )
    gc = getattr(model, "generation_config", None)
    eos = _as_ids(getattr(gc, "eos_token_id", None))
    pad = getattr(gc, "pad_token_id", None)

    def pick(attr: str, default: Any) -> Any:
        value = getattr(gc, attr, None)
        return default if value is None else value

    sampling = (float(pick("temperature", 1.0)), int(pick("top_k", 50)), float(pick("top_p", 1.0)))
    return GenPlan(
        num_stages=num_stages, layers=layers, max_length=int(max_length), layer_attr=layer_attr, norm_attr=norm_attr,
        eos_token_ids=eos, pad_token_id=None if pad is None else int(pad), sampling=sampling,
    )

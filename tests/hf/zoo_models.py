"""Tiny Hugging Face models built from config (random weights, float64, no dropout, default use_cache) with inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64
BATCH = 4
SEQ = 8


@dataclass
class Case:
    """One zoo entry: the model, its full-batch inputs, a loss and how to split it."""

    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    loss_fn: Callable[..., torch.Tensor] | None
    target: Any = None
    layers: list[str] | str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _ids(*shape: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(1, vocab, shape)


def _lm_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _cls_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits, target)


def _hidden_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    return (out.last_hidden_state * target).sum() / target.shape[0]


_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_BERTLIKE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=32, **_DROP)
_LLAMALIKE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=32)


def _mask() -> torch.Tensor:
    m = torch.ones(BATCH, SEQ, dtype=torch.long)
    m[1, -3:] = 0
    m[3, -1:] = 0
    return m


def build(name: str) -> Case:
    """Build the named zoo case (seeded; float64)."""
    import transformers as T

    torch.manual_seed(0)
    ids, tgt = _ids(BATCH, SEQ), _ids(BATCH, SEQ)
    case: Case
    if name == "bert":
        m = T.BertForSequenceClassification(T.BertConfig(**_BERTLIKE, num_labels=3))
        case = Case(m, (ids,), {"attention_mask": _mask()}, _cls_loss, torch.randint(0, 3, (BATCH,)))
    elif name == "roberta":
        m = T.RobertaForMaskedLM(T.RobertaConfig(**_BERTLIKE, pad_token_id=0))
        case = Case(m, (ids,), {"attention_mask": _mask()}, _lm_loss, tgt)
    elif name == "distilbert":
        cfg = T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, dropout=0.0,
                                 attention_dropout=0.0, max_position_embeddings=32)
        case = Case(T.DistilBertForMaskedLM(cfg), (ids,), {"attention_mask": _mask()}, _lm_loss, tgt)
    elif name == "albert":
        cfg = T.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
        m = T.AlbertForMaskedLM(cfg)
        case = Case(m, (ids,), {}, _lm_loss, tgt, layers=["albert.embeddings", "albert.encoder"])
    elif name == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                           bos_token_id=0, eos_token_id=0,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        case = Case(T.GPT2LMHeadModel(cfg), (ids,), {"labels": tgt}, None)
    elif name == "gpt_neo":
        cfg = T.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
                             window_size=4, max_position_embeddings=32, embed_dropout=0.0,
                             attention_dropout=0.0, resid_dropout=0.0)
        # GPT-Neo computes attention scores in float32 even in a float64 model (query.to(torch.float32)), so
        # micro-batched and whole-batch runs agree to float32 rounding only (7.9e-10 seen on one CPU, under 1e-10
        # on another: the float32 matmul's blocking depends on the machine)
        case = Case(T.GPTNeoForCausalLM(cfg), (ids,), {}, _lm_loss, tgt, extra={"tol": 1e-8})
    elif name == "opt":
        cfg = T.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                          max_position_embeddings=32, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                          pad_token_id=0)
        case = Case(T.OPTForCausalLM(cfg), (ids,), {"attention_mask": _mask()}, _lm_loss, tgt)
    elif name == "llama":
        case = Case(T.LlamaForCausalLM(T.LlamaConfig(**_LLAMALIKE)), (ids,), {"labels": tgt}, None)
    elif name == "mistral":
        case = Case(T.MistralForCausalLM(T.MistralConfig(**_LLAMALIKE, sliding_window=None)), (ids,), {}, _lm_loss, tgt)
    elif name == "qwen2":
        cfg = T.Qwen2Config(**_LLAMALIKE, tie_word_embeddings=True)
        case = Case(T.Qwen2ForCausalLM(cfg), (ids,), {}, _lm_loss, tgt)
    elif name == "phi":
        cfg = T.PhiConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=32, resid_pdrop=0.0,
                          embd_pdrop=0.0, attention_dropout=0.0)
        case = Case(T.PhiForCausalLM(cfg), (ids,), {}, _lm_loss, tgt)
    elif name == "falcon":
        cfg = T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             hidden_dropout=0.0, attention_dropout=0.0, new_decoder_architecture=False)
        case = Case(T.FalconForCausalLM(cfg), (ids,), {}, _lm_loss, tgt)
    elif name == "t5":
        cfg = T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                         dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
        case = Case(T.T5ForConditionalGeneration(cfg), (ids,), {"labels": tgt}, None)
    elif name == "bart":
        cfg = T.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                           dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
        case = Case(T.BartForConditionalGeneration(cfg), (ids,), {"labels": tgt}, None)
    elif name == "vit":
        cfg = T.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, num_labels=5, **_DROP)
        px = torch.randn(BATCH, 3, 16, 16)
        case = Case(T.ViTForImageClassification(cfg), (px,), {}, _cls_loss, torch.randint(0, 5, (BATCH,)))
    elif name == "clip_vision":
        cfg = T.CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, attention_dropout=0.0)
        px = torch.randn(BATCH, 3, 16, 16)
        case = Case(T.CLIPVisionModel(cfg), (px,), {}, _hidden_loss, torch.randn(BATCH, 17, 32))
    elif name == "resnet":
        cfg = T.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                             num_labels=4)
        px = torch.randn(BATCH, 3, 16, 16)
        case = Case(T.ResNetForImageClassification(cfg), (px,), {}, _cls_loss, torch.randint(0, 4, (BATCH,)))
    elif name == "convnext":
        cfg = T.ConvNextConfig(num_channels=3, patch_size=2, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4,
                               drop_path_rate=0.0)
        px = torch.randn(BATCH, 3, 16, 16)
        case = Case(T.ConvNextForImageClassification(cfg), (px,), {}, _cls_loss, torch.randint(0, 4, (BATCH,)))
    elif name == "whisper":
        cfg = T.WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2,
                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                              decoder_ffn_dim=64, max_source_positions=8, max_target_positions=16, dropout=0.0,
                              attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0,
                              decoder_start_token_id=1)
        feats = torch.randn(BATCH, 8, 16)
        case = Case(T.WhisperForConditionalGeneration(cfg), (feats,), {"labels": tgt}, None)
    else:
        from zoo_pippy_models import PIPPY_ZOO, build_pippy  # the architectures of PiPPy's HF examples

        if name not in PIPPY_ZOO:
            raise KeyError(name)
        return build_pippy(name)
    return finish(case)


def finish(case: Case) -> Case:
    """Float64 and eval mode for the model, float64 for the floating positional inputs."""
    case.model = case.model.double().eval()
    case.args = tuple(a.double() if a.is_floating_point() else a for a in case.args)
    return case


ZOO = ["bert", "roberta", "distilbert", "albert", "gpt2", "gpt_neo", "opt", "llama", "mistral", "qwen2", "phi",
       "falcon", "t5", "bart", "vit", "clip_vision", "resnet", "convnext", "whisper"]


def first_calls(model: nn.Module, names: list[str], *args: Any, **kwargs: Any) -> list[str]:
    """``names`` (modules of ``model``) in the order one forward of ``model`` first calls them."""
    order: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        return lambda *_: None if name in order else order.append(name)

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return order


def max_err(a: Any, b: Any) -> float:
    """Largest absolute difference over the tensor leaves of two pytrees (same structure)."""
    from torch.utils import _pytree as pytree

    la = [x for x in pytree.tree_leaves(a) if isinstance(x, torch.Tensor)]
    lb = [x for x in pytree.tree_leaves(b) if isinstance(x, torch.Tensor)]
    assert len(la) == len(lb), (len(la), len(lb))
    return max((float((x.double() - y.double()).abs().max()) for x, y in zip(la, lb)), default=0.0)


def grad_err(ref: nn.Module, grads: dict[str, torch.Tensor | None]) -> float:
    """Largest grad difference; every reference parameter must be covered by its own name or a tied alias."""
    by_id: dict[int, list[str]] = {}
    for n, p in ref.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    err = 0.0
    for n, p in ref.named_parameters(remove_duplicate=False):
        names = [a for a in by_id[id(p)] if a in grads]
        assert names, f"no pipeline stage holds {n} (or a tied alias)"
        for a in names:
            g = grads[a]
            if p.grad is None:
                assert g is None or float(g.abs().max()) == 0.0, f"{a}: unexpected grad"
                continue
            assert g is not None, f"{a}: pipeline produced no grad"
            err = max(err, float((g - p.grad).abs().max()))
    return err

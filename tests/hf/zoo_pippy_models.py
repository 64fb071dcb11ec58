"""Tiny builds of the architectures in PiPPy's HF examples (use_cache left at its default; float64; no dropout)."""

from __future__ import annotations

import torch
from zoo_models import BATCH, SEQ, VOCAB, Case, _ids, _lm_loss, _mask, finish

from pippy import TensorChunkSpec

_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_BERTLIKE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=32, **_DROP)
_BARTLIKE = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                 dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
_TROCR = dict(vocab_size=VOCAB, d_model=32, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=64,
              max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def _bbox() -> torch.Tensor:
    """LayoutLM boxes (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, all below max_2d_position_embeddings."""
    lo = torch.randint(0, 500, (BATCH, SEQ, 2))
    hi = lo + torch.randint(0, 500, (BATCH, SEQ, 2))
    return torch.cat([lo, hi], dim=-1)


def build_pippy(name: str) -> Case:
    """Build the named case (seeded; float64; eval), with the head class PiPPy's example for it used."""
    import transformers as T

    torch.manual_seed(0)
    ids, tgt = _ids(BATCH, SEQ), _ids(BATCH, SEQ)
    case: Case
    if name == "mbart":
        m = T.MBartForConditionalGeneration(T.MBartConfig(**_BARTLIKE, classifier_dropout=0.0))
        case = Case(m, (ids,), {"attention_mask": _mask(), "decoder_input_ids": _ids(BATCH, SEQ)}, _lm_loss, tgt)
    elif name == "mbart_causal":  # the decoder alone, as PiPPy's example ran it
        m = T.MBartForCausalLM(T.MBartConfig(**_BARTLIKE, classifier_dropout=0.0))
        case = Case(m, (ids,), {"attention_mask": _mask()}, _lm_loss, tgt)
    elif name == "blenderbot":
        m = T.BlenderbotForConditionalGeneration(T.BlenderbotConfig(**_BARTLIKE))
        case = Case(m, (ids,), {"attention_mask": _mask(), "decoder_input_ids": _ids(BATCH, SEQ)}, _lm_loss, tgt)
    elif name == "blenderbot_causal":  # as PiPPy's example ran it
        m = T.BlenderbotForCausalLM(T.BlenderbotConfig(**_BARTLIKE))
        case = Case(m, (ids,), {"attention_mask": _mask()}, _lm_loss, tgt)
    elif name == "deberta":  # disentangled attention as in microsoft/deberta-base
        cfg = T.DebertaConfig(**_BERTLIKE, relative_attention=True, pos_att_type=["c2p", "p2c"],
                              position_biased_input=False, pooler_dropout=0.0)
        case = Case(T.DebertaForMaskedLM(cfg), (ids,), {"attention_mask": _mask()}, _lm_loss, tgt)
    elif name == "deberta_v2":  # as microsoft/deberta-v3-base, with fewer position buckets
        cfg = T.DebertaV2Config(**_BERTLIKE, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                position_biased_input=False, position_buckets=16, norm_rel_ebd="layer_norm",
                                share_att_key=True, pooler_dropout=0.0)
        case = Case(T.DebertaV2ForMaskedLM(cfg), (ids,), {"attention_mask": _mask()}, _lm_loss, tgt)
    elif name == "electra":
        cfg = T.ElectraConfig(**_BERTLIKE, embedding_size=16, is_decoder=True, summary_last_dropout=0.0)
        case = Case(T.ElectraForCausalLM(cfg), (ids,), {"attention_mask": _mask()}, _lm_loss, tgt)
    elif name == "fnet":
        cfg = T.FNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           max_position_embeddings=32, hidden_dropout_prob=0.0)
        case = Case(T.FNetForMaskedLM(cfg), (ids,), {}, _lm_loss, tgt)
    elif name == "layoutlm":
        m = T.LayoutLMForMaskedLM(T.LayoutLMConfig(**_BERTLIKE))
        case = Case(m, (ids,), {"bbox": _bbox(), "attention_mask": _mask()}, _lm_loss, tgt)
    elif name == "megatron_bert":
        m = T.MegatronBertForCausalLM(T.MegatronBertConfig(**_BERTLIKE, is_decoder=True))
        case = Case(m, (ids,), {"attention_mask": _mask()}, _lm_loss, tgt)
    elif name == "mobilebert":
        cfg = T.MobileBertConfig(**_BERTLIKE, embedding_size=16, intra_bottleneck_size=16, num_feedforward_networks=2)
        case = Case(T.MobileBertForMaskedLM(cfg), (ids,), {"attention_mask": _mask()}, _lm_loss, tgt)
    elif name == "xlnet":
        # perm_mask/target_mapping (two-stream attention, the only reader of transformer.mask_emb) cannot run in
        # float64: transformers' XLNetRelativeAttention.forward omits the r.type(self.r.dtype) cast on that path
        cfg = T.XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, d_inner=64, dropout=0.0,
                            summary_last_dropout=0.0)
        seg = torch.zeros(BATCH, SEQ, dtype=torch.long)
        seg[:, SEQ // 2 :] = 1
        seg[:, -1] = 2  # <cls>, as XLNet's tokenizer marks it
        # mems are (seq, batch, hidden): they merge along dim 1
        merge = [TensorChunkSpec(0), TensorChunkSpec(1), TensorChunkSpec(1)]
        case = Case(T.XLNetLMHeadModel(cfg), (ids,), {"attention_mask": _mask(), "token_type_ids": seg}, _lm_loss,
                    tgt, extra={"output_merge_spec": merge})
    elif name == "convbert":
        cfg = T.ConvBertConfig(**_BERTLIKE, embedding_size=16, conv_kernel_size=3)
        case = Case(T.ConvBertForMaskedLM(cfg), (ids,), {"attention_mask": _mask()}, _lm_loss, tgt)
    elif name == "camembert":
        m = T.CamembertForMaskedLM(T.CamembertConfig(**_BERTLIKE))
        case = Case(m, (ids,), {"attention_mask": _mask()}, _lm_loss, tgt)
    elif name == "trocr":  # the composite TrOCR checkpoints load as: ViT encoder, TrOCR decoder
        enc = T.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, **_DROP)
        cfg = T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, T.TrOCRConfig(**_TROCR))
        px = torch.randn(BATCH, 3, 16, 16)
        case = Case(T.VisionEncoderDecoderModel(cfg), (px,), {"decoder_input_ids": ids}, _lm_loss, tgt)
    elif name == "trocr_causal":  # the decoder alone, as PiPPy's example ran it
        m = T.TrOCRForCausalLM(T.TrOCRConfig(**_TROCR))
        case = Case(m, (ids,), {"attention_mask": _mask()}, _lm_loss, tgt)
    else:
        raise KeyError(name)
    return finish(case)


PIPPY_ZOO = ["mbart", "mbart_causal", "blenderbot", "blenderbot_causal", "deberta", "deberta_v2", "electra", "fnet", "layoutlm",
             "megatron_bert", "mobilebert", "xlnet", "convbert", "camembert", "trocr", "trocr_causal"]

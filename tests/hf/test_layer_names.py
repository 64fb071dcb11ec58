"""pippy.hf finds the layers of models whose block lists are nested, parallel or of mixed classes, and splits them evenly."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")

import transformers as T
from zoo_models import first_calls, grad_err, max_err

from pippy import Schedule1F1B, SplitPoint, pipeline
from pippy.hf import layer_names, split_spec_equal_layers
from pippy.runtime.local import LocalPipeline

V, B, L = 64, 4, 8
END = SplitPoint.END


pytestmark = pytest.mark.usefixtures("one_thread")


def _lm_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), target.reshape(-1))


def _exact_on_two_stages(make: Callable[[], nn.Module], tol: float = 1e-10) -> list[set[str]]:
    """Train one step through the default 2-stage split; outputs and grads equal the model's. Returns each stage's
    top-level layer modules (names up to the list index)."""
    torch.manual_seed(0)
    model = make().double().eval()
    ids, tgt = torch.randint(1, V, (B, L)), torch.randint(1, V, (B, L))
    ref = copy.deepcopy(model)
    out_ref = ref(ids)
    _lm_loss(out_ref, tgt).backward()
    pipe = pipeline(model, 2, (ids,), split_spec=split_spec_equal_layers(model, 2))
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=_lm_loss)
    out = lp.step(ids, target=tgt)
    assert max_err(out.logits, out_ref.logits) < tol
    assert grad_err(ref, lp.named_grads()) < tol
    names = layer_names(model)
    return [{n for n in names if any(k.startswith(n + ".") for k in pipe.get_stage_module(s).state_dict())}
            for s in range(2)]


def _funnel() -> nn.Module:
    return T.FunnelForMaskedLM(T.FunnelConfig(vocab_size=V, block_sizes=[2, 1, 1], num_decoder_layers=1, d_model=32,
                                              n_head=4, d_head=8, d_inner=64, hidden_dropout=0.0,
                                              attention_dropout=0.0, activation_dropout=0.0))


def test_a_list_of_lists_gives_the_modules_inside() -> None:
    # Funnel's encoder.blocks holds lists of layers; the lists themselves never run as modules
    blocks = [f"funnel.encoder.blocks.{b}.{i}" for b, i in ((0, 0), (0, 1), (1, 0), (2, 0))]
    assert layer_names(_funnel()) == blocks
    assert split_spec_equal_layers(_funnel(), 2) == {blocks[1]: END}
    assert _exact_on_two_stages(_funnel) == [set(blocks[:2]), set(blocks[2:])]


def _xlm() -> nn.Module:
    return T.XLMWithLMHeadModel(T.XLMConfig(vocab_size=V, emb_dim=32, n_layers=4, n_heads=4, dropout=0.0,
                                            attention_dropout=0.0, max_position_embeddings=64))


def test_parallel_lists_interleave_by_layer() -> None:
    # XLM keeps attentions, layer_norm1, ffns, layer_norm2 as four lists its forward indexes with the layer number
    parts = ("attentions", "layer_norm1", "ffns", "layer_norm2")
    assert layer_names(_xlm()) == [f"transformer.{p}.{k}" for k in range(4) for p in parts]
    assert split_spec_equal_layers(_xlm(), 2) == {"transformer.layer_norm2.1": END}
    assert split_spec_equal_layers(_xlm(), 3) == {"transformer.layer_norm2.1": END, "transformer.layer_norm2.2": END}
    stages = _exact_on_two_stages(_xlm)
    assert stages == [{f"transformer.{p}.{k}" for p in parts for k in ks} for ks in ((0, 1), (2, 3))]


class _Zipped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
        self.mix = nn.ModuleList(nn.ModuleList(nn.Linear(2, 2) for _ in range(2)) for _ in range(3))
        self.enc = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))  # walked one after the other, not side by side
        self.dec = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, mix in zip(self.down, self.mix):
            x = down(x)
            for m in mix:
                x = m(x)
        for block in self.enc:
            x = block(x)
        for block in self.dec:
            x = block(x)
        return x


def test_lists_walked_with_zip_interleave_and_lists_walked_in_turn_do_not() -> None:
    net = _Zipped()
    assert layer_names(net) == ["down.0", "mix.0.0", "mix.0.1", "down.1", "mix.1.0", "mix.1.1", "down.2", "mix.2.0",
                                "mix.2.1", "enc.0", "enc.1", "enc.2", "dec.0", "dec.1", "dec.2"]
    # a layer of the zipped lists is down.k with mix.k: 9 layers, 3 per stage
    assert split_spec_equal_layers(net, 3) == {"mix.2.1": END, "enc.2": END}
    x = torch.randn(4, 2)
    pipe = pipeline(net, 2, (x,), split_spec=split_spec_equal_layers(net, 3))
    assert pipe.num_stages == 3


def _jamba() -> nn.Module:
    return T.JambaForCausalLM(T.JambaConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_d_conv=3, mamba_expand=2, mamba_dt_rank=4,
        experts_implementation="batched_mm"))  # the default grouped_mm has no float64 on CPU


def test_the_base_models_only_list_may_mix_block_classes() -> None:
    # Jamba's model.layers alternates Mamba and attention layers
    layers = [f"model.layers.{k}" for k in range(4)]
    assert layer_names(_jamba()) == layers
    # its Mamba mixer computes in float32 inside the float64 model: micro-batches agree to float32 rounding
    assert _exact_on_two_stages(_jamba, tol=1e-8) == [set(layers[:2]), set(layers[2:])]


def test_sequential_block_lists() -> None:
    def blocks() -> nn.Sequential:
        return nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(4)))

    assert layer_names(blocks()) == ["0", "1", "2", "3"]
    wrap = nn.Module()
    wrap.blocks, wrap.head = blocks(), nn.Linear(4, 2)
    assert layer_names(wrap) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert split_spec_equal_layers(wrap, 2) == {"blocks.1": END}


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.norm = nn.Linear(4, 4), nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.norm(self.lin(x)))


class _AttnBlock(_Block):  # another class of block in the same list
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.attn(x))


class _Stacked(nn.Module):  # a block that holds a block list of its own
    def __init__(self) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(_Block() for _ in range(2))
        self.up = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return self.up(x)


class _OutOfOrder(nn.Module):
    """Like a diffusers UNet: registered head, up, mid, down (``mid`` set after ``up``), run down, mid, up, head."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.up = nn.ModuleList([_Stacked(), _AttnBlock(), _Stacked()])
        self.mid = nn.ModuleList(_Block() for _ in range(2))
        self.down = nn.ModuleList([_Block(), _AttnBlock(), _Block()])
        self.proj = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))  # single layers of two classes: no block list

    def _encode(me, x: torch.Tensor) -> torch.Tensor:  # read whatever self is called
        for block in me.down:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._encode(self.proj(x))
        for block in [*self.mid, *self.up]:
            x = block(x)
        return self.head(x)


_IN_ORDER = ["down.0", "down.1", "down.2", "mid.0", "mid.1", "up.0.resnets.0", "up.0.resnets.1", "up.1",
             "up.2.resnets.0", "up.2.resnets.1"]


def test_blocks_registered_out_of_order_and_of_mixed_classes_come_in_execution_order() -> None:
    torch.manual_seed(0)
    net = _OutOfOrder().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    assert layer_names(net) == _IN_ORDER
    assert first_calls(net, _IN_ORDER, x) == _IN_ORDER
    # 10 layers in 4 stages: 3, 3, 2, 2
    spec = split_spec_equal_layers(net, 4)
    assert spec == {"down.2": END, "up.0.resnets.0": END, "up.1": END}
    pipe = pipeline(net, 2, (x,), split_spec=spec)
    assert pipe.num_stages == 4
    held = [[n for n in [*_IN_ORDER, "proj", "head"] if any(k.startswith(n + ".") for k in pipe.get_stage_module(s).state_dict())]
            for s in range(4)]
    assert held == [["down.0", "down.1", "down.2", "proj"], ["mid.0", "mid.1", "up.0.resnets.0"],
                    ["up.0.resnets.1", "up.1"], ["up.2.resnets.0", "up.2.resnets.1", "head"]]
    assert max_err(pipe(x)[0], net(x)) == 0.0


def test_a_list_of_blocks_of_mixed_classes_is_a_block_list() -> None:
    # not only the base model's only list (Jamba): any list of blocks, each made of modules
    mixed = nn.Sequential(_Block(), _AttnBlock(), _Block(), _AttnBlock())
    assert layer_names(mixed) == ["0", "1", "2", "3"]
    wrap = nn.Module()
    wrap.a, wrap.b = nn.ModuleList([_Block(), _AttnBlock()]), nn.ModuleList([_AttnBlock(), _Block()])
    assert layer_names(wrap) == ["a.0", "a.1", "b.0", "b.1"]  # no forward to read: registration order
    assert split_spec_equal_layers(wrap, 2) == {"a.1": END}
    # single layers of different classes (a projection, a stem) are not blocks
    assert layer_names(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4))) == []


class _Moe(nn.Module):  # a layer whose feed-forward is a list of experts
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x)
        return sum((e(x) for e in self.experts), x)


class _PrefixNamesNoChild(nn.Module):
    """Like transformers' MllamaForCausalLM: base_model_prefix names no child, so ``base_model`` is the model itself;
    the child ``model`` holds the one layer list, of mixed classes."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed, self.model.layers = nn.Linear(4, 4), nn.ModuleList(layers)
        self.lm_head = nn.Linear(4, 2)

    @property
    def base_model(self) -> nn.Module:  # transformers: getattr(self, self.base_model_prefix, self)
        return self


def test_the_only_list_of_a_base_model_that_base_model_prefix_does_not_name_may_mix_classes() -> None:
    # a layer holding its experts' list is one layer, as in Jamba (not its experts, one layer each)
    moe = _PrefixNamesNoChild([_Block(), _Moe(), _Block()])
    layers = ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert layer_names(moe) == layers
    assert split_spec_equal_layers(moe, 3) == {"model.layers.0": END, "model.layers.1": END}
    # single layers of different classes (were: no layers at all)
    assert layer_names(_PrefixNamesNoChild([nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4)])) == layers
    # the real thing: Mllama's text model mixes self- and cross-attention layers
    mllama = T.MllamaForCausalLM(T.MllamaTextConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, cross_attention_layers=[1], pad_token_id=0, bos_token_id=1, eos_token_id=2))
    assert mllama.base_model is mllama
    assert layer_names(mllama) == [f"model.layers.{k}" for k in range(4)]
    assert split_spec_equal_layers(mllama, 2) == {"model.layers.1": END}


class _Wide(nn.Module):  # a transformer-sized layer beside small convolution blocks
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(x)))


def test_small_mixed_blocks_beside_a_stack_of_one_class_are_not_layers() -> None:
    # wav2vec2's group-norm feature extractor (conv layers of two classes) beside its transformer layers
    net = nn.Module()
    net.features = nn.Module()
    net.features.conv = nn.ModuleList([_Block(), _AttnBlock(), _AttnBlock()])
    net.encoder = nn.Module()
    net.encoder.layers = nn.ModuleList(_Wide() for _ in range(4))
    assert layer_names(net) == ["encoder.layers.0", "encoder.layers.1", "encoder.layers.2", "encoder.layers.3"]
    assert split_spec_equal_layers(net, 2) == {"encoder.layers.1": END}


def test_an_embedding_and_a_head_around_a_stack_go_with_its_ends() -> None:
    # Sequential(embed, Sequential(blocks), head), the embed and head made of modules: 12 blocks, not 14 layers
    net = nn.Sequential(_AttnBlock(), nn.Sequential(*(_Block() for _ in range(12))), _Wide())
    assert layer_names(net) == [f"1.{k}" for k in range(12)]
    assert split_spec_equal_layers(net, 3) == {"1.3": END, "1.7": END}

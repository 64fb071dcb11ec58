"""Deferred init: trace a meta-device model; each stage loads or initializes only its own tensors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from models import MLPStack

from pippy import Schedule1F1B, SplitPoint, pipeline
from pippy.frontend.materialize import materialize_stage, pending_tensors, replace_meta
from pippy.runtime.local import LocalPipeline

pytest.importorskip("transformers")
import transformers as T

LLAMA = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=32, use_cache=False)
GPT2 = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, use_cache=False, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
SPEC = {"model.layers.0": SplitPoint.END}


def _grads_equal(ref: torch.nn.Module, lp: LocalPipeline) -> float:
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    return max(float((g - ref_params[n].grad).abs().max()) for n, g in lp.named_grads().items() if g is not None)


@pytest.mark.parametrize("init", ["given", "default"])
def test_meta_llama_loads_from_full_state_dict_and_trains_transparently(tmp_path: Path, init: str) -> None:
    torch.manual_seed(0)
    real = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)).double()
    torch.save(real.state_dict(), tmp_path / "full.pt")
    with torch.device("meta"):
        meta = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)).double()
    ids = torch.randint(0, 64, (4, 8))
    pipe = pipeline(meta, 2, (ids,), {"labels": ids}, split_spec=SPEC)
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=2)
    assert all(pending_tensors(st.submod) for st in lp.stages)  # NaN placeholders until filled
    for st in lp.stages:
        # rotary inv_freq is a non-persistent buffer (not in the state_dict): init_fn computes it, by default the
        # Hugging Face model's own _init_weights (the rotary module has no reset_parameters)
        init_fn = meta._init_weights if init == "given" else None
        materialize_stage(st, checkpoint=tmp_path / "full.pt", init_fn=init_fn, model=meta)
        assert pending_tensors(st.submod) == []
    want = {**dict(real.named_parameters()), **dict(real.named_buffers())}
    held = [n for st in lp.stages for n in st.submod.state_dict()]
    assert set(held) == set(real.state_dict())  # non-persistent buffers stay out of the stage state dicts too
    for st in lp.stages:
        for name, t in [*st.submod.named_parameters(), *st.submod.named_buffers()]:
            assert torch.equal(t, want[name]), name
    assert any(n.endswith("inv_freq") for st in lp.stages for n, _ in st.submod.named_buffers())
    # each stage holds only its own layers
    assert not any("layers.1" in n for n in lp.stages[0].submod.state_dict())
    real(ids, labels=ids).loss.backward()
    lp.step(ids, labels=ids)
    assert _grads_equal(real, lp) < 1e-10


def test_meta_gpt2_from_save_pretrained_safetensors_with_tied_head(tmp_path: Path) -> None:
    """save_pretrained stores the tied lm_head.weight once (as transformer.wte.weight); the alias is found."""
    torch.manual_seed(0)
    real = T.GPT2LMHeadModel(T.GPT2Config(**GPT2)).double()
    real.save_pretrained(tmp_path)
    ckpt = tmp_path / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    with torch.device("meta"):
        meta = T.GPT2LMHeadModel(T.GPT2Config(**GPT2)).double()
    ids = torch.randint(0, 64, (4, 8))
    pipe = pipeline(meta, 2, (ids,), {"labels": ids}, split_spec={"transformer.h.0": SplitPoint.END})
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=2)
    for st in lp.stages:
        materialize_stage(st, checkpoint=ckpt, model=meta)
    assert torch.equal(lp.stages[1].submod.get_parameter("lm_head.weight"), real.lm_head.weight)
    real(ids, labels=ids).loss.backward()
    lp.step(ids, labels=ids)
    assert _grads_equal(real, lp) < 1e-10


def test_init_without_checkpoint_uses_the_models_own_init() -> None:
    with torch.device("meta"):
        meta = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)).double()
    ids = torch.randint(0, 64, (4, 8))
    pipe = pipeline(meta, 2, (ids,), {"labels": ids}, split_spec=SPEC)
    stage = pipe.build_stage(1, "cpu")
    materialize_stage(stage, init_fn=meta._init_weights, model=meta)
    sd = stage.submod.state_dict()
    assert all(not t.isnan().any() for t in sd.values())
    assert torch.equal(sd["model.norm.weight"], torch.ones(32, dtype=torch.float64))
    assert 0.005 < float(sd["lm_head.weight"].std()) < 0.05  # normal(0, initializer_range=0.02)
    first = pipe.build_stage(0, "cpu")
    materialize_stage(first, init_fn=meta._init_weights, model=meta)
    inv = dict(first.submod.named_buffers())["model.rotary_emb.inv_freq"]  # non-persistent, computed by init
    assert torch.allclose(inv.float(), T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)).model.rotary_emb.inv_freq)


def test_reset_parameters_and_errors() -> None:
    with torch.device("meta"):
        meta = MLPStack(n=2).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    pipe = pipeline(meta, 2, (x,), split_spec={"blocks.0": SplitPoint.END})
    stage = pipe.build_stage(0, "cpu")
    with pytest.raises(ValueError, match="model="):
        materialize_stage(copy.deepcopy(pipe.get_stage_module(1)))
    materialize_stage(stage, model=meta)  # nn.Linear.reset_parameters on this stage's layers
    w = stage.submod.get_parameter("blocks.0.0.weight")
    assert not w.isnan().any() and float(w.abs().max()) <= 1 / 8**0.5 + 1e-12 and float(w.abs().sum()) > 0
    with torch.device("meta"):
        lin = torch.nn.Linear(3, 3)
    assert replace_meta(lin, "cpu") and pending_tensors(lin) == ["weight", "bias"]
    with pytest.raises(ValueError, match="shape"):
        materialize_stage(lin, checkpoint={"weight": torch.zeros(2, 2), "bias": torch.zeros(3)})


def test_build_stage_loads_checkpoint_for_meta_model(tmp_path) -> None:
    """pipe.build_stage(i, device, checkpoint=...) fills only stage i, by original FQN."""
    from models import MLPStack

    from pippy import SplitPoint, pipeline

    torch.manual_seed(0)
    real = MLPStack(4)
    path = tmp_path / "full.pt"
    torch.save(real.state_dict(), path)
    with torch.device("meta"):
        meta = MLPStack(4)
    pipe = pipeline(meta, 2, (torch.randn(4, 8),), split_spec={"blocks.1": SplitPoint.END})
    full = real.state_dict()
    for i in range(pipe.num_stages):
        stage = pipe.build_stage(i, "cpu", checkpoint=str(path))
        sd = stage.state_dict()
        assert sd and all(torch.equal(v, full[k]) for k, v in sd.items())
        assert not any(t.is_meta for t in stage.submod.parameters())


def test_placeholders_left_unfilled_are_refused_at_the_first_step() -> None:
    from pippy import StageError

    torch.manual_seed(0)
    real = MLPStack(2).double()
    with torch.device("meta"):
        model = MLPStack(2).double()
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    pipe = pipeline(model, 2, (x.to("meta"),), split_spec={"blocks.0": SplitPoint.END})
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=torch.nn.functional.mse_loss)
    with pytest.raises(StageError, match=r"stage 0 .*NaN placeholders of a model traced on the meta device.*"
                                         r"load_state_dict"):
        lp.step(x, target=y)
    # PiPPy's way: load the real weights into the built stages, then train
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=torch.nn.functional.mse_loss)
    full = real.state_dict()
    for st in lp.stages:
        st.submod.load_state_dict({k: full[k] for k in st.state_dict()})
    ref = copy.deepcopy(real)
    torch.nn.functional.mse_loss(ref(x), y).backward()
    lp.step(x, target=y)
    grads = lp.named_grads()
    assert all(torch.allclose(grads[n], p.grad, atol=1e-12) for n, p in ref.named_parameters())


class _Scaled(torch.nn.Module):
    """A non-persistent buffer (not in state_dict) next to the parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x)) * self.scale)


def test_a_checkpoint_lacking_stage_parameters_is_refused_naming_them_and_the_prefix(tmp_path: Path) -> None:
    torch.manual_seed(0)
    real = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(4)))
    prefixed = {"model." + k: v for k, v in real.state_dict().items()}  # a wrapper's checkpoint
    torch.save(prefixed, tmp_path / "full.pt")
    with torch.device("meta"):
        meta = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(4)))
    pipe = pipeline(meta, 2, (torch.randn(4, 4, device="meta"),), split_spec={"1": SplitPoint.END})
    with pytest.raises(KeyError, match=r"stage 1: the checkpoint lacks 4 of the stage's parameters and persistent "
                                       r"buffers: \['2.weight', '2.bias', '3.weight', '3.bias'\].*under the prefix "
                                       r"'model.' .*removeprefix\('model.'\)"):
        pipe.build_stage(1, "cpu", checkpoint=tmp_path / "full.pt")
    stage = pipeline(copy.deepcopy(real), 2, (torch.randn(4, 4),), split_spec={"1": SplitPoint.END}).build_stage(1, "cpu")
    with pytest.raises(KeyError, match=r"lacks 4 .*under the prefix 'model.'"):
        materialize_stage(stage, checkpoint=prefixed)
    with pytest.raises(KeyError, match=r"lacks 1 .*\['3.bias'\](?!.*prefix)"):
        materialize_stage(stage, checkpoint={k: v for k, v in real.state_dict().items() if k != "3.bias"})
    inner = pipeline(torch.nn.Sequential(copy.deepcopy(real)), 2, (torch.randn(4, 4),), split_spec={"0.1": SplitPoint.END})
    with pytest.raises(KeyError, match=r"keys lack the prefix '0.' \(it has '2.weight' for '0.2.weight'\): add it"):
        materialize_stage(inner.build_stage(1, "cpu"), checkpoint=real.state_dict())


def test_only_non_persistent_buffers_may_be_missing_from_a_checkpoint() -> None:
    torch.manual_seed(0)
    real = _Scaled()
    stage = pipeline(copy.deepcopy(real), 2, (torch.randn(4, 4),), split_spec={"inp": SplitPoint.END}).build_stage(1, "cpu")
    with torch.no_grad():
        for p in stage.parameters():
            p.zero_()
    materialize_stage(stage, checkpoint=real.state_dict())  # "scale" is not state: it keeps its value
    assert torch.equal(stage.submod.get_parameter("out.weight"), real.out.weight)
    assert torch.equal(stage.submod.get_buffer("scale"), real.scale)

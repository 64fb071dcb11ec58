"""pippy.frontend.compiled: ``pipeline(torch.compile(model))`` traces the model itself, under the model's own names."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pippy
from pippy import Schedule1F1B, ScheduleZBH1, SplitPoint, checkpoint, pipe_split, pipeline
from pippy.frontend.compiled import compiled_inner, uncompiled
from pippy.hf import split_spec_equal_layers
from pippy.runtime.local import LocalPipeline

WARNS = (r"pipeline\(\): the model is a torch.compile wrapper \(OptimizedModule\); pippy uses the model inside it.*"
         r"'a.weight', not '_orig_mod.a.weight'.*stage.submod.compile\(\)")


class _Net(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        for blk in self.blocks:
            h = torch.tanh(blk(h))
        return self.head(h)


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def _train(model: nn.Module, lp: LocalPipeline, steps: int = 3) -> None:
    """AdamW steps of ``lp`` and of ``model`` (plain): gradients and parameters agree in float64."""
    opt_r = torch.optim.AdamW(model.parameters(), lr=0.05)
    opt_p = torch.optim.AdamW([p for st in lp.stages for p in st.parameters()], lr=0.05)
    for k in range(steps):
        x, y = _data(k)
        F.cross_entropy(model(x), y).backward()
        lp.step(x, target=y)
        grads = lp.named_grads()
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=1e-12, msg=f"step {k}: {n}")
        opt_r.step(), opt_p.step(), opt_r.zero_grad(), opt_p.zero_grad()
    params = {n: p for st in lp.stages for n, p in st.state_dict(keep_vars=True).items()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(params[n], p, rtol=0, atol=1e-12, msg=n)


@pytest.mark.parametrize("cls", [Schedule1F1B, ScheduleZBH1], ids=lambda c: c.__name__)
def test_a_compiled_model_pipelines_as_the_model_under_its_own_names(cls, tmp_path) -> None:
    """``pipeline(torch.compile(model), split_spec=...)``: a warning that the stages run eagerly; stage names are the
    model's ('a.weight', was '_orig_mod.a.weight', and the first step raised AttributeError: '_Net' object has no
    attribute 'graph'); 3 AdamW steps equal the plain model; a checkpoint merges into the uncompiled model's keys
    (model= the compiled one too)."""
    torch.manual_seed(0)
    model = _Net().double()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model)
    with pytest.warns(UserWarning, match=WARNS):
        pipe = pipeline(compiled, 4, (_data(0)[0],), split_spec={"blocks.0": SplitPoint.END,
                                                                 "_orig_mod.blocks.1": SplitPoint.END})
    assert pipe.num_stages == 3 and pipe.source_model() is model
    lp = LocalPipeline(pipe, cls, num_ranks=3, n_microbatches=4, loss_fn=F.cross_entropy)
    names = [n for st in lp.stages for n in st.state_dict()]
    assert sorted(names) == sorted(model.state_dict()), names
    _train(ref, lp)
    checkpoint.save(lp.stages, tmp_path, model=compiled)
    merged = checkpoint.merge(tmp_path, model=compiled)
    assert sorted(merged) == sorted(model.state_dict())
    ref.load_state_dict(merged, strict=True)  # the uncompiled model's keys, as torch's get_model_state_dict gives


def test_split_specs_made_from_a_compiled_model_name_the_model_s_modules() -> None:
    """``pippy.hf.split_spec_equal_layers(torch.compile(model), n)`` gives the names the stages get (no ``_orig_mod.``)."""
    model = _Net()
    compiled = torch.compile(model)
    assert split_spec_equal_layers(compiled, 3) == split_spec_equal_layers(model, 3) == {
        "blocks.0": SplitPoint.END, "blocks.1": SplitPoint.END}
    with pytest.warns(UserWarning, match=WARNS):
        pipe = pipeline(compiled, 2, (torch.randn(4, 8),), split_spec=split_spec_equal_layers(compiled, 3))
    assert pipe.num_stages == 3


class _OwnOrigMod(nn.Module):
    """A model whose own child is named ``_orig_mod``: no torch.compile wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self._orig_mod = nn.Linear(8, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self._orig_mod(x))
        pipe_split()
        return self.b(h)


def test_a_child_named_orig_mod_is_no_compile_wrapper() -> None:
    """A stage's ``unwrapped`` goes inside a torch.compile wrapper by its type, not by a child's name (was: it went into
    the child and the step raised AttributeError); ``stage.submod = torch.compile(stage.submod)`` is still unwrapped."""
    torch.manual_seed(0)
    model = _OwnOrigMod().double()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = pipeline(model, 4, (_data(0)[0],))
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=F.cross_entropy)
    assert lp.stages[0].unwrapped is lp.stages[0].submod and compiled_inner(model) is None
    _train(ref, lp, steps=2)
    submod = lp.stages[1].submod
    lp.stages[1].submod = torch.compile(submod, backend="eager")
    assert lp.stages[1].unwrapped is submod and compiled_inner(lp.stages[1].submod) is submod
    assert uncompiled(lp.stages[1].submod) is submod
    _train(ref, lp, steps=1)  # the compiled stage trains on, under its names


def test_pipeline_for_generation_takes_a_compiled_model_s_own() -> None:
    """``pipeline_for_generation(torch.compile(model))`` cuts the model itself (was: its check failed, the cut stages'
    logits 0.19 off the compiled wrapper's), with a warning that the stages run eagerly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))
    with pytest.warns(UserWarning, match=r"pipeline_for_generation\(\): the model is a torch.compile wrapper"):
        gen = pippy.pipeline_for_generation(torch.compile(gpt2), 2)
    assert gen.model is gpt2

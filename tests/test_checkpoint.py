"""Checkpoint round trip: train pipelined, save per stage, merge into the unpipelined model (strict), load back."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pippy import Schedule1F1B, ScheduleInterleaved1F1B, SplitPoint, checkpoint, pipeline
from pippy.runtime.local import LocalPipeline

pytest.importorskip("transformers")
import transformers as T

GPT2 = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, use_cache=False, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
          dropout_rate=0.0, use_cache=False, decoder_start_token_id=0, pad_token_id=0)


def _train(name: str, steps: int = 3) -> tuple[torch.nn.Module, torch.nn.Module, LocalPipeline, torch.Tensor]:
    """Train ``steps`` Adam steps pipelined and unpipelined from the same init; return (ref, model, lp, ids)."""
    torch.manual_seed(0)
    if name == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(**GPT2)).double().eval()
        spec, cls = {"transformer.h.0": SplitPoint.END}, Schedule1F1B
    else:
        model = T.T5ForConditionalGeneration(T.T5Config(**T5)).double().eval()
        spec = {"encoder.block.0": SplitPoint.END, "encoder.block.1": SplitPoint.END, "decoder.block.0": SplitPoint.END}
        cls = ScheduleInterleaved1F1B
    ids = torch.randint(1, 64, (4, 8))
    ref = copy.deepcopy(model)
    pipe = pipeline(model, 4, (ids,), {"labels": ids}, split_spec=spec)
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=4)
    opts = [torch.optim.Adam(st.parameters(), lr=1e-2) for st in lp.stages]  # one optimizer per stage
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for _ in range(steps):
        for o in (*opts, ref_opt):
            o.zero_grad()
        lp.step(ids, labels=ids)
        ref(ids, labels=ids).loss.backward()
        for o in (*opts, ref_opt):
            o.step()
    return ref, model, lp, ids


@pytest.mark.parametrize(("name", "fmt"), [("gpt2", "torch"), ("gpt2", "dcp"), ("t5", "dcp")])
def test_train_save_merge_load(tmp_path: Path, name: str, fmt: str) -> None:
    ref, model, lp, _ids = _train(name)
    checkpoint.save(lp.stages, tmp_path, format=fmt, model=model)
    merged = checkpoint.merge(tmp_path, model=ref)
    fresh = copy.deepcopy(ref)
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(merged, strict=True)  # every tied alias present (lm_head.weight, shared.weight, ...)
    for n, p in ref.named_parameters(remove_duplicate=False):
        assert torch.allclose(dict(fresh.named_parameters(remove_duplicate=False))[n], p, atol=1e-10, rtol=0), n
    # load back into a fresh pipeline's stages, per stage
    before = {n: t.clone() for st in lp.stages for n, t in st.submod.state_dict().items()}
    for st in lp.stages:
        for t in st.submod.parameters():
            t.data.zero_()
    checkpoint.load(lp.stages, tmp_path, format=fmt)
    for st in lp.stages:
        for n, t in st.submod.state_dict().items():
            assert torch.equal(t, before[n]), n


def test_merge_without_model_fills_pipe_aliases_and_errors(tmp_path: Path) -> None:
    ref, _model, lp, _ = _train("gpt2", steps=1)
    checkpoint.save(lp.stages, tmp_path)
    merged = checkpoint.merge(tmp_path)
    assert torch.equal(merged["lm_head.weight"], merged["transformer.wte.weight"])
    ref.load_state_dict(merged, strict=True)
    with pytest.raises(ValueError, match="format"):
        checkpoint.save(lp.stages, tmp_path, format="zip")
    with pytest.raises(FileNotFoundError, match="pippy checkpoint"):
        checkpoint.merge(tmp_path / "nothing")


def _run(lp: LocalPipeline, opt: torch.optim.Optimizer, ids: torch.Tensor, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randint(1, 64, (4, 8), generator=g)
        opt.zero_grad()
        lp.step(x, labels=x)
        opt.step()


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_resume_with_optimizer_state_continues_bit_identically(tmp_path: Path, fmt: str) -> None:
    """3 AdamW steps straight == 2 steps, save (model + optimizer), fresh pipeline, load, 1 step; float64, bitwise."""
    runs = []
    for resume in (False, True):
        torch.manual_seed(0)
        model = T.GPT2LMHeadModel(T.GPT2Config(**GPT2)).double().eval()
        ids = torch.randint(1, 64, (4, 8))
        pipe = pipeline(model, 4, (ids,), {"labels": ids}, split_spec={"transformer.h.0": SplitPoint.END})
        lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4)
        opt = torch.optim.AdamW([p for st in lp.stages for p in st.parameters()], lr=1e-2, weight_decay=0.1)
        _run(lp, opt, ids, range(2))
        if resume:
            checkpoint.save(lp.stages, tmp_path, format=fmt, optimizer=opt)
            torch.manual_seed(1)  # another init: everything must come from the checkpoint
            fresh = T.GPT2LMHeadModel(T.GPT2Config(**GPT2)).double().eval()
            pipe = pipeline(fresh, 4, (ids,), {"labels": ids}, split_spec={"transformer.h.0": SplitPoint.END})
            lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4)
            opt = torch.optim.AdamW([p for st in lp.stages for p in st.parameters()], lr=0.5, weight_decay=0.1)
            checkpoint.load(lp.stages, tmp_path, format=fmt, optimizer=opt)
            assert opt.param_groups[0]["lr"] == 1e-2  # hyperparameters come back too
        _run(lp, opt, ids, range(2, 3))
        runs.append({k: v.clone() for st in lp.stages for k, v in st.state_dict().items()})
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_loading_optimizer_state_that_lacks_parameters_names_them(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    pipe = pipeline(net, 2, (torch.randn(4, 4),), split_spec={"0": SplitPoint.END})
    st0 = pipe.build_stage(0, "cpu")
    checkpoint.save([st0], tmp_path, optimizer=torch.optim.AdamW([st0.submod.get_parameter("0.weight")]))
    with pytest.raises(KeyError, match=r"stage 0: the checkpoint's optimizer and this one hold different parameters; "
                                       r"this optimizer holds \['0.bias'\], which no param group of the checkpoint's"):
        checkpoint.load([st0], tmp_path, optimizer=torch.optim.AdamW(st0.parameters()))


def _mlp_lp(n_stages: int, seed: int = 0) -> LocalPipeline:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(4))).double()
    spec = {str(i): SplitPoint.END for i in range(4 // n_stages - 1, 3, 4 // n_stages)}
    pipe = pipeline(net, 2, (torch.randn(4, 4, dtype=torch.float64),), split_spec=spec)
    return LocalPipeline(pipe, Schedule1F1B, num_ranks=n_stages, n_microbatches=2, loss_fn=torch.nn.functional.mse_loss)


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
@pytest.mark.parametrize("make", [lambda ps: torch.optim.Adam(ps, lr=1e-2),
                                  lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
                                  lambda ps: torch.optim.SGD(ps, lr=0.1)], ids=["adam", "sgd-momentum", "sgd"])
def test_saving_before_the_first_step_changes_nothing_and_resumes_exactly(tmp_path: Path, fmt: str, make) -> None:
    """A save before the optimizer's first step gives it no state (torch's helper would step it with zero grads:
    Adam's step 1, SGD's momentum from weight decay), and a resume from there trains like no save at all."""
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    runs = []
    for mode in ("plain", "save", "resume"):
        lp = _mlp_lp(2)
        opt = make([p for st in lp.stages for p in st.parameters()])
        if mode != "plain":
            checkpoint.save(lp.stages, tmp_path / mode, format=fmt, optimizer=opt)
            assert not opt.state
        if mode == "resume":
            lp = _mlp_lp(2, seed=1)
            opt = make([p for st in lp.stages for p in st.parameters()])
            checkpoint.load(lp.stages, tmp_path / "save", format=fmt, optimizer=opt)
        for _ in range(3):
            opt.zero_grad()
            lp.step(x, target=y)
            opt.step()
        runs.append({k: v.clone() for st in lp.stages for k, v in st.state_dict().items()})
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]) and torch.equal(runs[0][k], runs[2][k]), k


def test_an_optimizer_over_some_parameters_and_a_dcp_resplit_keep_their_hyperparameters(tmp_path: Path) -> None:
    """Adam over the last layer only saves and loads; a DCP checkpoint of 2 stages loads into 4 with every stage's
    learning rate (a stage index the saved split lacked takes the optimizer's saved groups)."""
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    lp = _mlp_lp(2)
    opt = torch.optim.Adam(lp.stages[1].submod.get_submodule("3").parameters(), lr=1e-2)
    lp.step(x, target=y)
    opt.step()
    checkpoint.save(lp.stages, tmp_path / "some", optimizer=opt)
    opt2 = torch.optim.Adam(lp.stages[1].submod.get_submodule("3").parameters(), lr=0.5)
    checkpoint.load(lp.stages, tmp_path / "some", optimizer=opt2)
    assert opt2.param_groups[0]["lr"] == 1e-2 and len(opt2.state) == 2
    opt = torch.optim.SGD([p for st in lp.stages for p in st.parameters()], lr=0.01, momentum=0.9)
    lp.step(x, target=y)
    opt.step()
    checkpoint.save(lp.stages, tmp_path / "two", format="dcp", optimizer=opt)
    four = _mlp_lp(4, seed=1)
    opts = [torch.optim.SGD(st.parameters(), lr=0.1, momentum=0.9) for st in four.stages]
    for st, o in zip(four.stages, opts):
        checkpoint.load([st], tmp_path / "two", format="dcp", optimizer=o)
    assert [o.param_groups[0]["lr"] for o in opts] == [0.01] * 4
    assert all(len(o.state) == 2 for o in opts)


class RootBuffer(torch.nn.Module):
    """A non-persistent buffer on the model itself, read by both stages."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.randn(8), persistent=False)
        self.l1, self.l2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x) + self.scale) * self.scale[:1])


def test_root_non_persistent_buffers_stay_out_of_stage_state_dicts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RootBuffer()
    pipe = pipeline(copy.deepcopy(model), 2, (torch.randn(4, 8),), split_spec={"l1": SplitPoint.END})
    stages = [pipe.build_stage(i, "cpu") for i in range(2)]
    assert sorted(k for st in stages for k in st.state_dict()) == sorted(model.state_dict())
    checkpoint.save(stages, tmp_path / "ck")
    model.load_state_dict(checkpoint.merge(tmp_path / "ck"), strict=True)

"""Train / eval mode: dropout and batch norm in a traced pipe follow ``.train()`` / ``.eval()`` of the stage modules."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from models import mse
from torch import nn

import pippy
from pippy import SplitPoint, pipeline
from pippy.frontend.trainmode import mode_args, module_modes
from pippy.runtime.local import LocalPipeline

W = 6


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.drop, self.norm = nn.Linear(W, W), nn.Dropout(0.5), nn.BatchNorm1d(W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.tanh(self.drop(self.lin(x))))


class Net(nn.Module):
    """Four blocks (one per stage), each with a dropout and a batch norm; attention with dropout at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block() for _ in range(4)))
        self.head = nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x)
        q = self.head(h).view(h.shape[0], 2, W // 2)  # two tokens per sample
        att = nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.3 if self.training else 0.0)
        return att.flatten(1) + h


SPLIT = {f"blocks.{i}": SplitPoint.END for i in range(3)}
CASES = [(pippy.Schedule1F1B, 4, 1), (pippy.ScheduleZBH1, 4, 1), (pippy.ScheduleZBV, 2, 2),
         (pippy.ScheduleInterleaved1F1B, 2, 2)]


def _setup(traced: str) -> tuple[Net, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = getattr(Net().double(), traced)()
    x, y = torch.randn(8, W, dtype=torch.float64), torch.randn(8, W, dtype=torch.float64)
    return net, x, y


def _set_stages(lp: LocalPipeline, mode: str) -> None:
    for st in lp.stages:
        getattr(st.submod, mode)()


@pytest.mark.parametrize(("cls", "ranks", "per_rank"), CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_a_train_traced_pipe_runs_in_eval_mode_exactly(cls, ranks, per_rank) -> None:
    net, x, y = _setup("train")
    pipe = pipeline(copy.deepcopy(net), 4, (x,), split_spec=SPLIT)
    lp = LocalPipeline(pipe, cls, num_ranks=ranks, n_microbatches=4, loss_fn=mse)
    lp.step(x, target=y)  # a training step first (dropout on): builds split backward's taps in train mode
    _set_stages(lp, "eval")
    ref = copy.deepcopy(net).eval()
    for st in lp.stages:  # the trained weights and statistics of the step above
        ref.load_state_dict({**ref.state_dict(), **st.state_dict()})
    buffers = {k: v.clone() for st in lp.stages for k, v in st.state_dict().items() if "running" in k or "tracked" in k}
    assert torch.allclose(lp.eval(x), ref(x), atol=1e-12, rtol=0)
    for st in lp.stages:  # eval mode: statistics read, neither updated nor counted
        for k, v in st.state_dict().items():
            if k in buffers:
                assert torch.equal(v, buffers[k]), k
    # training in eval mode (no dropout, running statistics): transparent against the eval-mode model
    for st in lp.stages:
        st.submod.zero_grad()
    out = ref(x)
    mse(out, y).backward()
    assert torch.allclose(lp.step(x, target=y), out, atol=1e-12, rtol=0)
    grads = lp.named_grads()
    for n, p in ref.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-12, rtol=0), n


def test_back_to_train_restores_the_traced_graph() -> None:
    net, x, _ = _setup("train")
    pipe = pipeline(net, 4, (x,), split_spec=SPLIT)
    stage = pipe.build_stage(0, "cpu")
    traced = [(a.node.name, a.traced) for a in mode_args(stage.submod.get_submodule("blocks.0.drop").graph)]
    assert traced == [("dropout", True)]
    stage.submod.eval()
    assert stage.follow_modes()
    assert [n.args[2] for n in stage.submod.get_submodule("blocks.0.drop").graph.nodes if n.op == "call_function"] \
        == [False]
    stage.submod.train()
    assert stage.follow_modes() and not stage.follow_modes()  # the second call: nothing changed since
    assert [n.args[2] for n in stage.submod.get_submodule("blocks.0.drop").graph.nodes if n.op == "call_function"] \
        == [True]


def test_an_eval_traced_pipe_trains_with_dropout_and_batch_statistics() -> None:
    net, x, _ = _setup("eval")
    blocks = net.blocks  # (attention traced in eval mode has dropout_p=0, which train mode cannot recover)
    stage = pipeline(copy.deepcopy(blocks), 1, (x,)).build_stage(0, "cpu")
    mean = stage.submod.get_buffer("0.norm.running_mean").clone()
    stage.submod.train()
    torch.manual_seed(1)
    out = stage.submod(x)[0]  # a direct call of the module follows its mode too
    assert not torch.allclose(out, blocks(x))  # dropout and batch statistics now apply
    assert not torch.equal(stage.submod.get_buffer("0.norm.running_mean"), mean)  # statistics updated
    torch.manual_seed(1)
    assert torch.allclose(out, copy.deepcopy(blocks).train()(x), atol=1e-12, rtol=0)  # the model's very draws


def test_modules_traced_in_eval_inside_a_training_model_keep_their_mode() -> None:
    net, x, y = _setup("train")
    net.blocks[1].eval()  # e.g. a frozen block
    net.blocks[2].drop.eval()  # a module that owns no tensor: the pipe's flat stage graphs hold no module for it
    pipe = pipeline(copy.deepcopy(net), 4, (x,), split_spec=SPLIT)
    assert module_modes(net) == pipe.traced_modes

    def drops(lp: LocalPipeline) -> list[bool]:  # the dropouts' train flags: in the stage trees, in the flat graphs
        tree = [a.node.args[2] for st in lp.stages for m in st.submod.modules() if hasattr(m, "graph")
                for a in mode_args(m.graph) if a.node.name.startswith("dropout")]
        flat = [a.node.args[2] for st in lp.stages for a in mode_args(st.flat_module().graph)
                if a.node.name.startswith("dropout")]
        assert tree == flat
        return tree

    lp = LocalPipeline(pipe, pippy.ScheduleZBH1, num_ranks=4, n_microbatches=4, loss_fn=mse)
    assert not lp.stages[1].submod.get_submodule("blocks.1").training
    assert not lp.stages[2].submod.get_submodule("blocks.2.drop").training
    assert lp.stages[2].submod.get_submodule("blocks.2").training
    lp.step(x, target=y)  # split backward: the flat graphs keep the traced modes too
    assert drops(lp) == [True, False, False, True]
    _set_stages(lp, "eval")
    lp.eval(x)
    assert drops(lp) == [False] * 4
    _set_stages(lp, "train")
    lp.stages[1].submod.get_submodule("blocks.1").eval()
    lp.step(x, target=y)  # block 1 back as traced; block 2's dropout now on, as model.train() would set it
    assert drops(lp) == [True, False, True, True]


def test_pipe_call_follows_the_stage_modules_mode() -> None:
    net, x, _ = _setup("train")
    pipe = pipeline(copy.deepcopy(net), 2, (x,), split_spec=SPLIT)
    pipe.split_gm.eval()
    assert torch.allclose(pipe(x)[0], copy.deepcopy(net).eval()(x), atol=1e-12, rtol=0)
    built = pipe.build_stage(0, "cpu")  # pipe(x) now runs this stage's module: it follows that module's mode
    built.submod.eval()
    assert torch.allclose(pipe(x)[0], copy.deepcopy(net).eval()(x), atol=1e-12, rtol=0)


def test_pipe_train_and_eval_set_every_stage_module() -> None:
    net, x, _ = _setup("train")
    pipe = pipeline(copy.deepcopy(net), 2, (x,), split_spec=SPLIT)
    assert pipe.training and pipe.eval() is pipe and not pipe.training
    assert not any(pipe.get_stage_module(i).training for i in range(pipe.num_stages))
    assert torch.allclose(pipe(x)[0], copy.deepcopy(net).eval()(x), atol=1e-12, rtol=0)
    assert pipe.train() is pipe and pipe.training
    pipe(x)  # (micro-batch by micro-batch: batch norm's statistics are state the stages write)
    assert [a.node.args[2] for i in range(pipe.num_stages) for a in mode_args(pipe.get_stage_module(i).graph)
            if a.node.name.startswith("dropout")] == [True] * 4


def test_batch_norm_in_train_mode_warns_that_micro_batches_have_their_own_statistics() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"batch norm in train mode \(1\) normalizes each micro-batch by its own"):
        pipeline(net, 2, (torch.randn(8, 4),), split_spec={"0": SplitPoint.END})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipeline(net.eval(), 2, (torch.randn(8, 4),), split_spec={"0": SplitPoint.END})  # running statistics: exact
        pipeline(net.train(), 1, (torch.randn(8, 4),), split_spec={"0": SplitPoint.END})  # one micro-batch: exact


def test_buffers_written_in_forward_warn_that_each_micro_batch_updates_them() -> None:
    """A step counter and an EMA written in forward advance once per micro-batch; batch norm keeps its own warning."""

    class Stateful(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.register_buffer("calls", torch.zeros(()))
            self.register_buffer("ema", torch.zeros(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            self.calls.add_(1)
            self.ema.mul_(0.9).add_(0.1 * h.detach().mean(0))
            return self.b(h)

    with pytest.warns(UserWarning, match=r"forward updates the buffers calls, ema\. Each micro-batch's forward") as got:
        pipeline(Stateful(), 2, (torch.randn(8, 4),), split_spec={"a": SplitPoint.END})
    assert len([w for w in got if "pipeline()" in str(w.message)]) == 1
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.warns(UserWarning) as got:
        pipeline(net, 2, (torch.randn(8, 4),), split_spec={"0": SplitPoint.END})
    assert [str(w.message).split(" (")[0] for w in got if "pipeline()" in str(w.message)] == [
        "pipeline(): batch norm in train mode"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipeline(Stateful(), 1, (torch.randn(8, 4),), split_spec={"a": SplitPoint.END})  # one micro-batch: exact


class DropPath(nn.Module):
    """timm's drop path: a Python branch on ``self.training``, which the trace takes once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = x.new_empty(x.shape[0], 1).bernoulli_(0.8)
        return x * keep / 0.8


class Sampling(nn.Module):
    """Draws noise in both modes alike (a VAE's sampling): nothing to switch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.randn_like(x)


@pytest.mark.parametrize("noise", [DropPath, Sampling])
def test_random_ops_a_mode_branch_left_are_warned_about_once(noise: type) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(W, W), nn.Sequential(nn.Linear(W, W), noise()), nn.Linear(W, W)).double()
    x = torch.randn(8, W, dtype=torch.float64)
    pipe = pipeline(net, 4, (x,), split_spec={"0": SplitPoint.END})
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=mse)
    _set_stages(lp, "eval")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lp.eval(x)
        lp.eval(x)
    said = [str(w.message) for w in seen if "draw random numbers" in str(w.message)]
    if noise is Sampling:
        assert said == []
        return
    assert len(said) == 1, said
    assert "1.1: bernoulli_ at" in said[0] and "keep = x.new_empty" in said[0]
    assert "pipeline(model.eval(), ...)" in said[0] and "drop_path_rate=0" in said[0]


def test_a_drop_path_traced_in_eval_mode_is_warned_about_in_train_mode() -> None:
    """Traced in eval mode it ran no op (it returned its input), so in train mode it still does."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(W, W), nn.Sequential(nn.Linear(W, W), DropPath()), nn.Linear(W, W)).double()
    x, y = torch.randn(8, W, dtype=torch.float64), torch.randn(8, W, dtype=torch.float64)
    pipe = pipeline(net.eval(), 4, (x,), split_spec={"0": SplitPoint.END})
    assert pipe.idle_branches == {"1.1": "DropPath"}
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=mse)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lp.eval(x)  # still in eval mode: nothing to say
        _set_stages(lp, "train")
        lp.step(x, target=y)
        lp.step(x, target=y)
    said = [str(w.message) for w in seen if "ran no op" in str(w.message)]
    assert len(said) == 1 and "1.1 (DropPath)" in said[0] and "pipeline(model.train(), ...)" in said[0], said

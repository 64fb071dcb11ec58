"""Stage modules keep the model's structure: original submodules under their FQNs, each one's forward runs."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import transformers as T
from torch import nn

from pippy import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBH1,
    ScheduleZBV,
    SplitPoint,
    pipe_split,
    pipeline,
)
from pippy.frontend.outline import Blocks, outline
from pippy.recompute import enable_recompute
from pippy.runtime.local import LocalPipeline

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
MODELS: dict[str, tuple[Any, str, str]] = {
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)), "model.layers", "model.layers.1"),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4)),
             "transformer.h", "transformer.h.1"),
    "bert": (lambda: T.BertForMaskedLM(T.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=4, num_attention_heads=4)),
             "bert.encoder.layer", "bert.encoder.layer.1"),
}


def _stage_values(pipe: Any, x: torch.Tensor, modules: list[nn.Module]) -> list[tuple[Any, ...]]:
    outs: list[tuple[Any, ...]] = []
    for s, info in enumerate(pipe.stage_infos):
        ins = [x if r.src_stage == -1 else outs[r.src_stage][r.index] for r in info.inputs]
        outs.append(tuple(modules[s](*ins)))
    return outs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_outlined_stages_compute_the_same_and_own_the_same_tensors(name: str) -> None:
    build, blocks, cut = MODELS[name]
    torch.manual_seed(0)
    model = build().double().eval()
    x = torch.randint(0, 64, (2, 8))
    pipe = pipeline(model, 1, (x,), split_spec={cut: SplitPoint.END})
    flat = [info.module for info in pipe.stage_infos]
    tree = [outline(m) for m in flat]
    for a, b in zip(_stage_values(pipe, x, flat), _stage_values(pipe, x, tree)):
        assert all(torch.equal(u, v) for u, v in zip(a, b) if isinstance(u, torch.Tensor))
    for f, t in zip(flat, tree):
        assert list(f.state_dict()) == list(t.state_dict()) or sorted(f.state_dict()) == sorted(t.state_dict())
        for fqn, p in f.named_parameters():
            assert t.get_parameter(fqn) is p  # the same objects: no copy
    assert [n for n, _ in tree[0].get_submodule(blocks).named_children()] == ["0", "1"]
    assert [n for n, _ in tree[1].get_submodule(blocks).named_children()] == ["2", "3"]
    holder = tree[1].get_submodule(blocks)
    assert isinstance(holder, Blocks) and len(holder) == 2 and holder[3] is tree[1].get_submodule(f"{blocks}.3")


def test_a_module_called_twice_keeps_one_entry_and_its_tensors() -> None:
    torch.manual_seed(0)
    model = T.AlbertForMaskedLM(T.AlbertConfig(vocab_size=64, hidden_size=32, embedding_size=16, intermediate_size=64,
                                               num_hidden_layers=3, num_attention_heads=4)).double().eval()
    x = torch.randint(0, 64, (2, 8))
    flat = pipeline(model, 1, (x,)).stage_infos[0].module
    tree = outline(flat)
    assert torch.equal(tree(x)[0], flat(x)[0])
    assert sorted(tree.state_dict()) == sorted(flat.state_dict())
    assert not any("@" in n for n, _ in tree.named_modules())


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def _blocks_setup(sched: Any, ranks: int) -> tuple[Any, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = _Net().double()
    ref = _Net().double()
    ref.load_state_dict(model.state_dict())
    X, Y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    nn.MSELoss()(ref(X), Y).backward()
    n = ranks * (2 if sched is ScheduleInterleaved1F1B else 1)
    cuts = {f"layers.{k}": SplitPoint.END for k in range(4 // n - 1, 3, 4 // n)}
    return pipeline(model, 4, (X,), split_spec=cuts), ref, X, Y


@pytest.mark.parametrize("sched", [Schedule1F1B, ScheduleInterleaved1F1B])
def test_block_hooks_fire_per_microbatch_and_recompute_on_blocks_stays_transparent(sched: Any) -> None:
    pipe, ref, X, Y = _blocks_setup(sched, 2)
    lp = LocalPipeline(pipe, sched, num_ranks=2, n_microbatches=4, loss_fn=nn.MSELoss())
    calls: dict[str, int] = {}
    for st in lp.stages:
        layers = st.submod.get_submodule("layers") if hasattr(st.submod, "layers") else None
        for name, block in (layers.named_children() if layers is not None else ()):
            block.register_forward_pre_hook(lambda *_, k=name: calls.__setitem__(k, calls.get(k, 0) + 1))
            enable_recompute(block)
    lp.step(X, target=Y)
    assert calls == {str(k): 4 for k in range(4)}  # once per micro-batch (recompute reruns forward, not the hooks)
    for st in lp.stages:
        for fqn, p in st.submod.named_parameters():
            torch.testing.assert_close(p.grad, ref.get_parameter(fqn).grad, rtol=0, atol=1e-13)


@pytest.mark.parametrize("recompute", [False, True])
def test_split_backward_runs_hooked_blocks_through_their_hooks(recompute: bool) -> None:
    """ZB-H1 on stages with hooked (or recomputed) blocks: the hooks fire and the gradients stay exact."""
    pipe, ref, X, Y = _blocks_setup(ScheduleZBH1, 2)
    lp = LocalPipeline(pipe, ScheduleZBH1, num_ranks=2, n_microbatches=4, loss_fn=nn.MSELoss())
    calls: list[str] = []
    for st in lp.stages:
        for name, block in st.submod.get_submodule("layers").named_children():
            block.register_forward_pre_hook(lambda *_, k=name: calls.append(k))
            if recompute:
                enable_recompute(block)
    lp.step(X, target=Y)
    assert sorted(set(calls)) == ["0", "1", "2", "3"] and len(calls) == 16
    for st in lp.stages:
        for fqn, p in st.submod.named_parameters():
            torch.testing.assert_close(p.grad, ref.get_parameter(fqn).grad, rtol=0, atol=1e-13)


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.g, self.f = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # a higher-order op (wrap_with_set_grad_enabled) with its own subgraph
            gate = torch.sigmoid(self.g(x))
        return torch.tanh(self.f(x)) * gate


class _Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond((x * 0).sum() == 0, lambda t: self.b(t), lambda t: -self.b(t), (x,))


class _Regions(nn.Module):
    """no_grad, autocast and torch.cond regions at the top and inside blocks, one stage each."""

    def __init__(self) -> None:
        super().__init__()
        self.g1, self.br, self.g2, self.out = _Gate(), _Branch(), _Gate(), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale = torch.sigmoid(self.out(x)).mean(-1, keepdim=True)
        x = self.g1(x) * scale
        pipe_split()
        with torch.autocast("cpu", enabled=False):
            x = self.br(x)
        pipe_split()
        x = self.g2(x)
        pipe_split()
        return self.out(x)


def _outlined_step_is_exact(model: nn.Module, d: int, sched: Any, ranks: int) -> Any:
    """One step of ``model`` (inputs and targets of width ``d``) under ``sched``, with no stage falling back to its flat
    graph: output and every gradient as the plain model's (1e-12); returns the pipe."""
    x, y = torch.randn(8, d, dtype=torch.float64), torch.randn(8, d, dtype=torch.float64)
    ref = copy.deepcopy(model)
    out = ref(x)
    torch.nn.functional.mse_loss(out, y).backward()
    pipe = pipeline(model, 4, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stage falls back to its flat graph
        lp = LocalPipeline(pipe, sched, num_ranks=ranks, n_microbatches=4, loss_fn=torch.nn.functional.mse_loss)
        got = lp.step(x, target=y)
    assert torch.allclose(got, out, atol=1e-12, rtol=0)
    grads = lp.named_grads()
    for n, p in ref.named_parameters():
        assert (grads.get(n) is None) == (p.grad is None), n
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, atol=1e-12, rtol=0), n
    return pipe


@pytest.mark.parametrize(("sched", "ranks"), [(Schedule1F1B, 4), (ScheduleZBH1, 4), (ScheduleZBV, 2)],
                         ids=["1f1b", "zbh1", "zbv"])
def test_higher_order_op_regions_outline_and_stay_transparent(sched: Any, ranks: int) -> None:
    torch.manual_seed(0)
    pipe = _outlined_step_is_exact(_Regions().double(), 8, sched, ranks)
    calls: list[str] = []
    stage = pipe.build_stage(2, "cpu")
    stage.submod.get_submodule("g2.f").register_forward_hook(lambda *a: calls.append("g2.f"))
    stage.submod(torch.randn(2, 8, dtype=torch.float64))
    assert calls == ["g2.f"]


class _TwiceInRegion(nn.Module):
    """Block ``b`` called first inside a no_grad or autocast region, then again outside (a teacher signal)."""

    def __init__(self, region: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.region = region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        pipe_split()
        with torch.no_grad() if self.region == "no_grad" else torch.autocast("cpu", dtype=torch.bfloat16):
            e = self.b(x)  # float64 stays float64 under CPU autocast: the region is a subgraph, the numbers exact
        return self.b(x) * e


@pytest.mark.parametrize("sched", [ScheduleGPipe, Schedule1F1B, ScheduleZBH1], ids=lambda c: c.__name__)
@pytest.mark.parametrize("region", ["no_grad", "autocast"])
def test_a_block_first_called_inside_a_region_outlines_and_trains_exactly(region: str, sched: Any) -> None:
    """Before, the block's first call outside the region was ``b@1`` with children ``0@1``, ``1@1``; its adoption
    as ``b`` lost the names the graph calls, and build_stage raised AttributeError: '0@1'."""
    torch.manual_seed(0)
    pipe = _outlined_step_is_exact(_TwiceInRegion(region).double(), 6, sched, 2)
    calls: list[str] = []
    stage = pipe.build_stage(1, "cpu")
    stage.submod.get_submodule("b.0").register_forward_hook(lambda *a: calls.append("b.0"))
    stage.submod(torch.randn(2, 6, dtype=torch.float64))
    assert "b.0" in calls


def test_an_unforeseen_outline_failure_falls_back_to_the_flat_graph_with_a_warning(monkeypatch) -> None:
    import pippy.frontend.stagemodule as stagemodule

    def broken(flat: Any) -> Any:
        raise AttributeError("'InterpreterModule' object has no attribute '0@1'")

    monkeypatch.setattr(stagemodule, "outline", broken)
    torch.manual_seed(0)
    model = _TwiceInRegion("no_grad").double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    ref = copy.deepcopy(model)
    torch.nn.functional.mse_loss(ref(x), y).backward()
    with pytest.warns(UserWarning, match=r"runs as one flat graph.*AttributeError"):
        lp = LocalPipeline(pipeline(model, 4, (x,)), Schedule1F1B, num_ranks=2, n_microbatches=4,
                           loss_fn=torch.nn.functional.mse_loss)
    lp.step(x, target=y)
    for n, p in ref.named_parameters():
        assert torch.allclose(lp.named_grads()[n], p.grad, atol=1e-12, rtol=0), n

"""The stage's split backward: I then W equals the full backward B, including weights read twice in one stage."""

from __future__ import annotations

import copy

import pytest
import torch
from models import mse
from torch import nn

import pippy
from pippy import pipe_split, pipeline
from pippy.runtime.local import LocalPipeline


class Reused(nn.Module):
    """Stage 0 applies one Linear twice (ALBERT-style sharing); stage 1 reads it again (tied across stages)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.mid = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        pipe_split()
        return self.shared(torch.relu(self.mid(h)))


def _grads_of(cls: type, model: nn.Module, x: torch.Tensor, tgt: torch.Tensor) -> dict[str, torch.Tensor | None]:
    pipe = pipeline(copy.deepcopy(model), 2, (x,))
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=2, loss_fn=mse)
    lp.step(x, target=tgt)
    return lp.named_grads()


def test_split_backward_equals_full_backward_with_reuse() -> None:
    torch.manual_seed(0)
    model = Reused().double()
    x = torch.randn(4, 8, dtype=torch.float64)
    tgt = torch.randn(4, 8, dtype=torch.float64)
    ref = copy.deepcopy(model)
    mse(ref(x), tgt).backward()
    full = _grads_of(pippy.Schedule1F1B, model, x, tgt)
    split = _grads_of(pippy.ScheduleZBH1, model, x, tgt)
    for name, p in ref.named_parameters():
        assert torch.allclose(full[name], p.grad, atol=1e-12), name
        assert torch.allclose(split[name], p.grad, atol=1e-12), name


def test_stage_api_i_then_w() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    pipe = pipeline(model, 1, (x,))
    stage = pipe.build_stage(0, "cpu")
    out = stage.forward(0, [x], training=True, split_backward=True)
    stage.set_loss(0, out[0].pow(2).sum())
    stage.backward_input(0)
    assert all(p.grad is None for p in stage.parameters())  # I computes no weight grads
    stage.backward_weight(0)
    ref = copy.deepcopy(model)
    ref(x).pow(2).sum().backward()
    for (_, p), (_, q) in zip(stage.submod.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-12)
    assert stage.live_microbatches() == 0


class Norms(nn.Module):
    """3-D activations through Linear and LayerNorm (the closed-form weight-grad paths) over 2 stages."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.na = nn.LayerNorm(16, eps=1e-3)
        self.b = nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.na(torch.tanh(self.a(x)))
        pipe_split()
        return self.b(h)


def test_closed_form_weight_grads_match_autograd() -> None:
    torch.manual_seed(0)
    model = Norms().double()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    tgt = torch.randn(4, 5, 8, dtype=torch.float64)
    ref = copy.deepcopy(model)
    mse(ref(x), tgt).backward()
    got = _grads_of(pippy.ScheduleZBH1, model, x, tgt)
    for name, p in ref.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-12), name
    stage = pipeline(copy.deepcopy(model), 2, (x,)).build_stage(0, "cpu")
    stage.forward(0, [x[:2]], training=True, split_backward=True)
    assert [f.kind for f in stage.taps.forms if f is not None] == ["linear", "layer_norm"]


def test_activation_counter_keeps_nothing_alive_after_clear() -> None:
    """measure_activations' saved-tensor hook must not tie a dropped forward into a reference cycle."""
    import gc

    from pippy import SplitPoint, pipeline

    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Sigmoid())
    x = torch.randn(4, 8)
    stage = pipeline(net, 2, (x,), split_spec={"2": SplitPoint.BEGINNING}).build_stage(0, "cpu")
    stage.measure_activations = True

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    stage.forward(0, [x[:2]], training=True)
    stage.clear()
    before = live()
    for _ in range(3):
        stage.forward(0, [x[:2]], training=True)
        assert stage.live_activation_bytes() > 0
        stage.clear()
    assert live() == before


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, block in enumerate(self.blocks):
            x = block(x)
            if k < 3:
                pipe_split()
        return x


def _hook(kind: str, module: nn.Module, prefix: str = "") -> None:
    """Parameter grad hooks, or full backward hooks on blocks, that scale what they see (as the plain model's do)."""
    for name, block in module.named_modules():
        if not name.startswith(prefix + "blocks.") or name.count(".") != prefix.count(".") + 1:
            continue
        if kind == "param":
            block.get_submodule("0").weight.register_hook(lambda g: g * 2)
        else:
            block.register_full_backward_hook(lambda mod, gin, gout: tuple(None if g is None else g * 2 for g in gin))


@pytest.mark.parametrize("kind", ["param", "module"])
@pytest.mark.parametrize("cls", ["ScheduleZBH1", "ScheduleZBV", "ScheduleDualPipeV"])
def test_parameter_and_backward_hooks_run_under_split_backward(cls: str, kind: str) -> None:
    """Hooks a flat graph's closed-form W would skip (a parameter's grad hook, a block's backward hook) make the
    stage split its backward through its own module: grads equal the plain model's with the same hooks."""
    torch.manual_seed(0)
    model = _Blocks().double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    ref = copy.deepcopy(model)
    _hook(kind, ref)
    mse(ref(x), y).backward()
    pipe = pipeline(model, 4, (x,))
    lp = LocalPipeline(pipe, getattr(pippy, cls), num_ranks=2 if cls != "ScheduleZBH1" else 4, n_microbatches=4,
                       loss_fn=mse)
    for stage in lp.stages:
        _hook(kind, stage.submod)
    lp.step(x, target=y)
    grads = lp.named_grads()
    for n, p in ref.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-12), n


class _Chain(nn.Module):
    """Four Linear-tanh layers (each added to its input when ``residual``), one stage each."""

    def __init__(self, residual: bool = False) -> None:
        super().__init__()
        self.l = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, lin in enumerate(self.l):
            x = torch.tanh(lin(x)) + x if self.residual else torch.tanh(lin(x))
            if i < 3:
                pipe_split()
        return x


@pytest.mark.parametrize(("cls", "ranks"), [(pippy.ScheduleZBH1, 4), (pippy.ScheduleZBV, 2), (pippy.ScheduleDualPipeV, 2)])
def test_split_backward_follows_parameters_changed_between_steps(cls, ranks) -> None:
    """Freezing, unfreezing or replacing a stage's parameters after a step: the next step's W follows (the taps of
    split backward are rebuilt), as 1F1B's whole backward does."""
    torch.manual_seed(0)
    model = _Chain().double()
    model.l[2].weight.requires_grad_(False)  # frozen when traced
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    lp = LocalPipeline(pipeline(copy.deepcopy(model), 4, (x,)), cls, num_ranks=ranks, n_microbatches=4, loss_fn=mse)
    lp.step(x, target=y)
    new = {"l.3.weight": torch.randn(6, 6, dtype=torch.float64)}
    for mod in [model] + [st.submod for st in lp.stages]:
        for name, p in mod.named_parameters():
            p.requires_grad_(name != "l.1.weight")  # l.1 frozen now, l.2 unfrozen
        if "l.3.weight" in dict(mod.named_parameters()):  # a new tensor (load_state_dict(assign=True) does this)
            mod.get_submodule("l.3").weight = nn.Parameter(new["l.3.weight"].clone())
    lp.zero_grad()
    model.zero_grad(set_to_none=True)
    out = lp.step(x, target=y)
    ref = model(x)
    mse(ref, y).backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grads = lp.named_grads()
    for name, p in model.named_parameters():
        assert (grads[name] is None) == (p.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize(("cls", "ranks"), [(pippy.ScheduleZBH1, 4), (pippy.ScheduleZBH2, 4), (pippy.ScheduleZBH1, 2)])
def test_closed_form_weight_grads_under_autocast_land_in_the_parameter_dtype(cls, ranks) -> None:
    """bf16 autocast: W's closed form runs on the cast copies; its gradient goes into the float32 ``.grad``."""
    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(4) for m in (nn.Linear(16, 16), nn.Tanh())))
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    spec = {str(2 * i + 1): pippy.SplitPoint.END for i in range(3)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = copy.deepcopy(model)
        torch.nn.functional.mse_loss(ref(x).float(), y).backward()
        lp = LocalPipeline(pipeline(model, 4, (x,), split_spec=spec), cls, num_ranks=ranks, n_microbatches=4,
                           loss_fn=lambda o, t: torch.nn.functional.mse_loss(o.float(), t))
        lp.step(x, target=y)
    grads = lp.named_grads()
    for name, p in ref.named_parameters():
        g = grads[name]
        assert g is not None and g.dtype == torch.float32, name
        assert float((g - p.grad).norm() / p.grad.norm()) < 2e-2, name  # bf16 matmuls, summed per micro-batch


@pytest.mark.parametrize(("cls", "ranks"), [(pippy.Schedule1F1B, 4), (pippy.ScheduleZBV, 2)])
def test_stages_wrapped_in_torch_compile_train_exactly_and_keep_their_names(cls, ranks) -> None:
    """``stage.submod = torch.compile(stage.submod)``: split backward never runs the compiled backward twice (I runs it
    whole, W has nothing left); ``state_dict`` keeps the model's names (no ``_orig_mod.``). Inductor:
    ``test_compiled_split_backward.py``."""
    torch.manual_seed(0)
    model = _Chain(residual=True).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 4, (x,))
    lp = LocalPipeline(pipe, cls, num_ranks=ranks, n_microbatches=4, loss_fn=mse)
    torch._dynamo.reset()
    for st in lp.stages:
        st.submod = torch.compile(st.submod, backend="aot_eager")
    lp.step(x, target=y)
    mse(model(x), y).backward()
    assert sorted(lp.stages[0].state_dict()) == ["l.0.bias", "l.0.weight"]
    grads = lp.named_grads()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-12, msg=name)


class GroupNormConv(nn.Module):
    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8, affine=affine)
        self.conv2, self.norm2 = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        pipe_split()
        return self.head(torch.relu(self.norm2(self.conv2(h))).mean((2, 3)))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cls", ["ScheduleZBH1", "ScheduleZBH2"])
def test_group_norm_weight_grads_in_closed_form(cls: str, channels_last: bool) -> None:
    """GroupNorm's W pass has a closed form; on a channels_last input, torch's own backward to its weights alone
    crashes the process, so the closed form is what makes such stages train."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = GroupNormConv().double().to(memory_format=fmt)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64).contiguous(memory_format=fmt)
    y = torch.randn(4, 3, dtype=torch.float64)
    ref = copy.deepcopy(model)
    lp = LocalPipeline(pipeline(model, 2, (x,)), getattr(pippy, cls), num_ranks=2, n_microbatches=2, loss_fn=mse)
    lp.step(x, target=y)
    assert [f.kind for f in lp.stages[1].taps.forms if f is not None] == ["group_norm", "linear"]
    mse(ref(x), y).backward()
    grads = lp.named_grads()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-13, msg=lambda m, n=name: f"{n}: {m}")

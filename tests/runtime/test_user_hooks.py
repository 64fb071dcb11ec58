"""Hooks users attach to stages, parameters and torch itself run as in the plain model, or are warned about."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import mse
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_full_backward_hook
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

import pippy
from pippy import SplitPoint, pipeline
from pippy.runtime.local import LocalPipeline

SPLIT = [("ScheduleZBH1", 2), ("ScheduleZBV", 4), ("ScheduleDualPipeV", 4), ("Schedule1F1B", 2)]


def _setup(n_stages: int, n_mb: int = 4) -> tuple[nn.Module, object, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(4)]).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    cuts = {"1": SplitPoint.END} if n_stages == 2 else {str(i): SplitPoint.END for i in range(3)}
    pipe = pipeline(copy.deepcopy(model), n_mb, (x,), split_spec=cuts)
    return model, pipe, x, y


def _local(pipe: object, cls: str, fuse: bool | str = True) -> LocalPipeline:
    return LocalPipeline(pipe, getattr(pippy, cls), num_ranks=2, n_microbatches=4, loss_fn=mse, fuse_backward=fuse)


def _assert_grads(lp: LocalPipeline, ref: nn.Module) -> None:
    grads = lp.named_grads()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-12, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}")


def _accumulated(ref: nn.Module, x: torch.Tensor, y: torch.Tensor, n_mb: int = 4) -> None:
    """The reference gradients as micro-batch accumulation: what a per-micro-batch gradient hook sees."""
    for xc, yc in zip(x.chunk(n_mb), y.chunk(n_mb)):
        (F.mse_loss(ref(xc), yc) / n_mb).backward()


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("cls,n_stages", SPLIT)
def test_a_forward_hook_on_a_stage_s_own_module_runs_under_split_backward(cls: str, n_stages: int, fuse: bool) -> None:
    """A hook on ``stage.submod`` itself (not a block) runs once per micro-batch and its change to the output
    trains exactly (split-backward stages ran a flat copy that skipped it: ZB-H1 grads off by 0.22)."""
    model, pipe, x, y = _setup(n_stages)
    lp = _local(pipe, cls, fuse)
    calls = []
    last = lp.stages[-1] if n_stages == 2 else lp.stages[1]  # stage 1 holds block 1 under V placements
    last.submod.register_forward_hook(lambda mod, args, out: calls.append(1) or tuple(o * 1.5 for o in out))
    model[3 if n_stages == 2 else 1].register_forward_hook(lambda mod, args, out: out * 1.5)
    out = lp.step(x, target=y)
    ref_out = model(x)
    F.mse_loss(ref_out, y).backward()
    assert len(calls) == 4
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-14)
    _assert_grads(lp, model)


@pytest.mark.parametrize("cls,n_stages", SPLIT)
def test_global_module_hooks_leave_split_backward_exact(cls: str, n_stages: int) -> None:
    """torch's global module hooks (``register_module_forward_hook`` / ``..._full_backward_hook``) wrapped the
    flat copy's outputs, so its closed-form weight gradients got nothing (every .grad None under ZB-H1)."""
    model, pipe, x, y = _setup(n_stages)
    lp = _local(pipe, cls, fuse=False)
    seen: list[str] = []
    handles = [register_module_forward_hook(lambda mod, args, out: seen.append("f")),
               register_module_full_backward_hook(lambda mod, gin, gout: seen.append("b"))]
    try:
        lp.step(x, target=y)
    finally:
        for h in handles:
            h.remove()
    F.mse_loss(model(x), y).backward()
    assert "f" in seen and "b" in seen
    _assert_grads(lp, model)


@pytest.mark.parametrize("cls,n_stages", SPLIT[:3])
def test_torch_s_flop_counter_around_a_split_backward_step(cls: str, n_stages: int) -> None:
    """``FlopCounterMode`` (and ModuleTracker, which it uses) hooks every module's inputs; under the I pass's
    ``autograd.grad`` torch refused such a hook on a leaf ('A leaf node was passed ...')."""
    model, pipe, x, y = _setup(n_stages)
    lp = _local(pipe, cls)
    with FlopCounterMode(display=False) as counter:
        lp.step(x, target=y)
    F.mse_loss(model(x), y).backward()
    assert counter.get_total_flops() > 0
    _assert_grads(lp, model)


class _Half(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 0.5


@pytest.mark.parametrize("after_a_step", [False, True])
@pytest.mark.parametrize("cls,n_stages", SPLIT)
def test_parametrized_stage_weights_train_exactly(cls: str, n_stages: int, after_a_step: bool) -> None:
    """A parametrization registered on a stage's modules (weight_norm, spectral_norm, one's own) made the tapped copy
    fail ('weight is not an nn.Parameter'), or, registered after a first step, compute with the raw weight."""
    model, pipe, x, y = _setup(n_stages)
    lp = _local(pipe, cls)
    if after_a_step:
        lp.step(x, target=y)
        lp.zero_grad()
    for mod in [model, *(st.submod for st in lp.stages)]:
        for m in mod.modules():
            if isinstance(m, nn.Linear):
                parametrize.register_parametrization(m, "weight", _Half())
    out = lp.step(x, target=y)
    ref_out = model(x)
    F.mse_loss(ref_out, y).backward()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-14)
    _assert_grads(lp, model)


def test_forward_hooks_on_the_model_before_pipeline_are_named() -> None:
    """A hook registered before ``pipeline()`` ran only while tracing; a capture hook would stay empty silently."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).double()
    captured = []
    model[1].register_forward_hook(lambda mod, args, out: captured.append(out))
    with pytest.warns(UserWarning, match=r"forward hooks on 1 \(<lambda>\) ran once while tracing.*stage.submod"):
        pipeline(model, 2, (torch.randn(4, 4, dtype=torch.float64),), split_spec={"0": SplitPoint.END})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipeline(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), 2, (torch.randn(4, 4),),
                 split_spec={"0": SplitPoint.END})  # split points are hooks too: pippy's own, not named


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.mid = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.mid(torch.tanh(self.shared(x))))


@pytest.mark.parametrize("mode", ["replicate", "transmit"])
def test_a_gradient_hook_on_a_replicated_tied_weight_is_warned_about(mode: str) -> None:
    """Each replicated copy's hook sees its stage's share only (a clamp hook: grads off by 2.4e-2); transmit is
    exact and silent."""
    torch.manual_seed(0)
    model = _Tied().double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 4, (x,), split_spec={"mid": SplitPoint.END}, tied_weights=mode)
    lp = _local(pipe, "Schedule1F1B")
    for st in lp.stages:
        for name, p in st.unwrapped.named_parameters():
            if name.startswith("shared"):
                p.register_hook(lambda g: g * 2.0)  # linear in the gradient: the same either way
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lp.step(x, target=y)
    named = [str(w.message) for w in caught if "tied weight" in str(w.message)]
    if mode == "transmit":
        assert not named
        return
    assert named and "stage 0's shared.weight" in named[0] and "tied_weights='transmit'" in named[0]
    for p in model.shared.parameters():
        p.register_hook(lambda g: g * 2.0)
    _accumulated(model, x, y)
    _assert_grads(lp, model)


def test_optimizer_in_backward_is_explained() -> None:
    """A post-accumulate-grad hook that steps an optimizer changes weights a later micro-batch's backward needs."""
    _, pipe, x, y = _setup(2)
    lp = _local(pipe, "Schedule1F1B")

    opts = {p: torch.optim.SGD([p], lr=0.1) for st in lp.stages for p in st.unwrapped.parameters()}

    def step_in_backward(p: torch.Tensor) -> None:
        opts[p].step()
        opts[p].zero_grad()

    for p in opts:
        p.register_post_accumulate_grad_hook(step_in_backward)
    with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
        lp.step(x, target=y)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "optimizer in backward" in notes and "after schedule.step()" in notes
    assert notes.count("post-accumulate-grad hooks") == 1


class _OwnLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.b(torch.tanh(self.a(x))), labels)


def test_gradient_hooks_beside_the_model_s_own_counted_loss_are_warned_about() -> None:
    """The own counted mean's gradients get their last factor at the step's end, after the hooks ran."""
    torch.manual_seed(0)
    x, labels = torch.randn(8, 6, dtype=torch.float64), torch.tensor([1, -100, 2, -100, 2, 3, 4, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = pipeline(_OwnLoss().double(), 4, (x, labels), split_spec={"a": SplitPoint.END})
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=4)
    lp.stages[1].unwrapped.get_parameter("b.weight").register_hook(lambda g: g.clamp(-1e-3, 1e-3))
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) of this rank have gradient hooks, and the model computes"):
        lp.step(x, labels)


def test_library_hooks_are_not_named() -> None:
    """transformers' own hooks (gradient checkpointing's make_inputs_require_grads, as pippy's advice for reentrant
    checkpoints asks) are not the user's: no warning, and pipeline() under warnings-as-errors works."""
    from models import gpt2

    model = gpt2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    assert any(m._forward_hooks for m in model.modules())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline(model, 2, (torch.randint(0, 96, (2, 16)),), split_spec={"transformer.h.0": SplitPoint.END})
    assert not [w for w in caught if "forward hooks on" in str(w.message)]


class _Ema(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.register_buffer("ema", torch.ones(6, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        self.ema.mul_(0.9).add_(h.detach().mean(0) * 0.1)
        return torch.tanh(h * self.ema)


def test_a_buffer_written_then_saved_for_backward_is_named_in_the_error() -> None:
    """Plain PyTorch trains this (one forward); each micro-batch's forward overwrites what an earlier backward needs."""
    model = nn.Sequential(_Ema(), _Ema(), nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = pipeline(model, 4, (x,), split_spec={"0": SplitPoint.END})
    lp = _local(pipe, "Schedule1F1B")
    with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
        lp.step(x, target=y)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "writes the buffers 0.ema in place" in notes and "self.ema.clone()" in notes

"""Activation recompute: bitwise-equal outputs and grads in float64, with less saved activation memory."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from models import MarkedMLP, gpt2, lm_loss
from torch.utils._python_dispatch import TorchDispatchMode

from pippy import Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline
from pippy.recompute import disable_recompute, enable_recompute
from pippy.runtime.local import LocalPipeline


def _run(recompute: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], int]:
    torch.manual_seed(0)
    model = gpt2(n_layer=2)
    x, y = torch.randint(0, 96, (4, 16)), torch.randint(0, 96, (4, 16))
    pipe = pipeline(copy.deepcopy(model), 2, (x,), split_spec={"transformer.h.0": SplitPoint.END})
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=lm_loss)
    saved = 0
    if recompute:
        for st in lp.stages:
            enable_recompute(st)

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lp.step(x, target=y)
    return out.logits, lp.named_grads(), saved


def test_recompute_is_bitwise_transparent_and_saves_less() -> None:
    out_a, g_a, saved_a = _run(False)
    out_b, g_b, saved_b = _run(True)
    assert torch.equal(out_a, out_b)
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        assert g_a[k] is not None and g_b[k] is not None and torch.equal(g_a[k], g_b[k]), k
    assert saved_b < saved_a


def test_disable_recompute_restores_forward() -> None:
    lin = torch.nn.Linear(2, 2)
    enable_recompute(lin)
    assert "forward" in lin.__dict__
    disable_recompute(lin)
    assert "forward" not in lin.__dict__


def test_measured_activation_bytes_drop_with_recompute() -> None:
    """The runtime's activation-byte count: GPipe keeps more than 1F1B, recompute keeps less than either."""
    import pippy
    from pippy.runtime.local import LocalPipeline

    torch.manual_seed(0)
    x = torch.randn(16, 8, dtype=torch.float64)
    y = torch.randn(16, 4, dtype=torch.float64)
    peaks = {}
    for name, cls, rc in (("gpipe", pippy.ScheduleGPipe, False), ("1f1b", pippy.Schedule1F1B, False), ("1f1b_rc", pippy.Schedule1F1B, True)):
        pipe = pipeline(MarkedMLP(4, 1).double(), 8, (x,))
        lp = LocalPipeline(pipe, cls, num_ranks=4, n_microbatches=8, loss_fn=torch.nn.functional.mse_loss)
        for st in lp.stages:
            st.measure_activations = True
            if rc:
                enable_recompute(st)
        lp.step(x, target=y)
        peaks[name] = lp.schedules[0].last_peak_bytes[0]
    assert peaks["gpipe"] > peaks["1f1b"] > peaks["1f1b_rc"] > 0


def test_full_recompute_moves_running_statistics_once() -> None:
    """Backward runs a recomputed forward again; batch norm's running statistics (updated by a kernel that bumps no
    version) keep the values of the one real forward, in train mode and (read by backward there) in eval mode."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
                              torch.nn.Linear(8, 2)).double()
    ref = copy.deepcopy(net)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    pipe = pipeline(net, 1, (x,), split_spec={"3": SplitPoint.END})
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=1, loss_fn=torch.nn.functional.mse_loss)
    for st in lp.stages:
        enable_recompute(st)
    for train in (True, True, False):
        lp.stages[0].submod.train(train)
        ref.train(train)
        lp.step(x, target=y)
        torch.nn.functional.mse_loss(ref(x), y).backward()
        state = lp.stages[0].state_dict()
        for name, want in ref.state_dict().items():
            if name in state and ("running" in name or "tracked" in name):
                torch.testing.assert_close(state[name], want, rtol=0, atol=1e-15, msg=name)
        for n, p in ref.named_parameters():
            torch.testing.assert_close(lp.named_grads()[n], p.grad, rtol=0, atol=1e-12, msg=n)


class _SpectralNet(torch.nn.Module):
    def __init__(self, legacy: bool) -> None:
        super().__init__()
        norm = torch.nn.utils.spectral_norm if legacy else torch.nn.utils.parametrizations.spectral_norm
        self.a, self.b = norm(torch.nn.Linear(8, 8)), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("cls", [Schedule1F1B, ScheduleGPipe])
def test_full_recompute_reads_written_buffers_as_its_forward_did(cls: type, legacy: bool) -> None:
    """Spectral norm's forward moves its power-iteration vectors and reads them: a recompute that ran from what later
    micro-batches left differentiated another weight (grads off by 0.12, vectors drifting by 0.2)."""
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    runs = []
    for recompute in (False, True):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # forward updates buffers: named by pipeline(), not the point here
            pipe = pipeline(_SpectralNet(legacy).double(), 4, (x,), split_spec={"a": SplitPoint.END})
        lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=4, loss_fn=torch.nn.functional.mse_loss)
        if recompute:
            for st in lp.stages:
                enable_recompute(st)
        for _ in range(2):
            out = lp.step(x, target=y)
        runs.append((out, lp.named_grads(), lp.stages[0].state_dict()))
    (out, grads, state), (out_r, grads_r, state_r) = runs
    torch.testing.assert_close(out_r, out, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(grads_r[name], g, rtol=0, atol=0, msg=name)
    for name, v in state.items():
        torch.testing.assert_close(state_r[name], v, rtol=0, atol=0, msg=name)


class _Queue(torch.nn.Module):
    """A MoCo-style queue the forward writes but never reads, and a step counter nothing reads."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("queue", torch.zeros(64, 4, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        self.queue[: h.shape[0]] = h.detach()
        self.steps.add_(1)
        return torch.tanh(h)


def test_full_recompute_keeps_no_copy_of_buffers_only_written() -> None:
    """Only buffers the forward computes from are copied per micro-batch (a queue was copied at every forward)."""
    from pippy.runtime.recompute import _read_and_written

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = pipeline(torch.nn.Sequential(_Queue(), torch.nn.Linear(4, 2)).double(), 2,
                        (torch.randn(4, 4, dtype=torch.float64),), split_spec={"0": SplitPoint.END})
    stage = pipe.build_stage(0, "cpu")
    assert sorted(dict(stage.submod.named_buffers())) == ["0.queue", "0.steps"]
    assert _read_and_written(stage.submod, []) == []
    net = _SpectralNet(legacy=False)
    assert _read_and_written(net, []) == ["a.parametrizations.weight.0._u", "a.parametrizations.weight.0._v"]
    assert _read_and_written(_SpectralNet(legacy=True), []) == ["a.weight_u", "a.weight_v"]


class _HostSyncs(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (a stream sync on CUDA)."""

    OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in self.OPS:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def test_full_recompute_keeps_running_statistics_without_reading_them() -> None:
    """The recompute puts a batch norm's statistics back without comparing values (a host sync per buffer and
    micro-batch on CUDA): what to restore follows from the mode; every number equals the run without recompute."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
                                for _ in range(4)]).double()
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    runs = []
    for recompute in (False, True):
        pipe = pipeline(copy.deepcopy(net), 4, (x,), split_spec={"1": SplitPoint.END})
        lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=torch.nn.functional.mse_loss,
                           loss_reduction="mean")
        for st in lp.stages if recompute else ():
            enable_recompute(st)
        outs = []
        for train in (True, True, False):
            for st in lp.stages:
                st.submod.train(train)
            with _HostSyncs() as syncs:
                outs.append(lp.step(x, target=y))
            assert syncs.calls == [], (recompute, train, syncs.calls)
        runs.append((outs, lp.named_grads(), {k: v for st in lp.stages for k, v in st.state_dict().items()}))
    (want, want_grads, want_state), (got, got_grads, got_state) = runs
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert want_grads.keys() == got_grads.keys() and want_state.keys() == got_state.keys()
    for name, g in want_grads.items():
        assert torch.equal(got_grads[name], g), name
    for name, v in want_state.items():
        assert torch.equal(got_state[name], v), name

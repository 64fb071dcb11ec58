"""Transparency cases run inside spawned ranks: pipelined vs unpipelined, float64."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from models import AuxBranch, MarkedMLP, MLPStack, MyNetwork, SkipNet, TwoInputs, gpt2, lm_loss, main_mse, mse

import pippy
from pippy import SplitPoint, pipeline
from pippy.PipelineStage import PipelineStage

SINGLE = {"gpipe": pippy.ScheduleGPipe, "1f1b": pippy.Schedule1F1B, "zb_h1": pippy.ScheduleZBH1, "zb_h2": pippy.ScheduleZBH2}
MULTI = {
    "interleaved_1f1b": pippy.ScheduleInterleaved1F1B,
    "looped_bfs": pippy.ScheduleLoopedBFS,
    "zbv": pippy.ScheduleZBV,
    "dualpipev": pippy.ScheduleDualPipeV,
    "interleaved_zb": pippy.ScheduleZBH1,  # several stages per rank
}


def build(name: str, n_stages: int) -> tuple[torch.nn.Module, tuple, dict, Any, Callable, dict]:
    """Model, args, kwargs, target, loss_fn and pipeline() options for a named case."""
    torch.manual_seed(0)
    if name == "mlp_spec":
        m = MLPStack(n=n_stages).double()
        spec = {f"blocks.{i}": SplitPoint.END for i in range(n_stages - 1)}
        x = torch.randn(8, 8, dtype=torch.float64)
        return m, (x,), {}, torch.randn(8, 4, dtype=torch.float64), mse, {"split_spec": spec}
    if name == "mlp_marker":
        m = MarkedMLP(n=n_stages, per_stage=1).double()
        x = torch.randn(8, 8, dtype=torch.float64)
        return m, (x,), {}, torch.randn(8, 4, dtype=torch.float64), mse, {}
    if name == "skip":
        m = SkipNet(n_stages).double()
        x = torch.randn(8, 8, dtype=torch.float64)
        return m, (x,), {}, torch.randn(8, 3, dtype=torch.float64), mse, {}
    if name == "aux":  # stage 0's aux head gets no gradient: its params keep grad None
        m = AuxBranch(n_stages).double()
        x = torch.randn(8, 8, dtype=torch.float64)
        return m, (x,), {}, torch.randn(8, 2, dtype=torch.float64), main_mse, {}
    if name == "two_inputs":
        assert n_stages == 3
        m = TwoInputs().double()
        args = (torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64))
        kw = {"bias": torch.randn(8, 2, dtype=torch.float64)}
        return m, args, kw, torch.randn(8, 2, dtype=torch.float64), mse, {}
    if name == "gpt2":
        m = gpt2(n_layer=max(2, n_stages))
        per = m.config.n_layer // n_stages
        spec = {f"transformer.h.{per * (i + 1) - 1}": SplitPoint.END for i in range(n_stages - 1)}
        x = torch.randint(0, 96, (8, 16))
        return m, (x,), {}, torch.randint(0, 96, (8, 16)), lm_loss, {"split_spec": spec}
    raise KeyError(name)


def _max_err(a: Any, b: Any) -> float:
    la = torch.utils._pytree.tree_leaves(a)
    lb = torch.utils._pytree.tree_leaves(b)
    return max((float((x - y).abs().max()) for x, y in zip(la, lb) if isinstance(x, torch.Tensor)), default=0.0)


def transparency(rank: int, world: int, cases: list[tuple[str, str, int]], n_mb: int = 4) -> dict[str, dict[str, float]]:
    """For each (model, schedule, stages_per_rank): errors of outputs, loss, grads and eval on this rank."""
    report: dict[str, dict[str, float]] = {}
    for model_name, sched_name, spr in cases:
        n_stages = world * spr
        model, args, kwargs, target, loss_fn, opts = build(model_name, n_stages)
        ref = copy.deepcopy(model)
        out_ref = ref(*args, **kwargs)
        loss_ref = loss_fn(out_ref, target)
        loss_ref.backward()
        pipe = pipeline(model, n_mb, example_args=args, example_kwargs=kwargs, **opts)
        assert pipe.num_stages == n_stages, (model_name, pipe.num_stages, n_stages)
        cls = SINGLE.get(sched_name) or MULTI[sched_name]
        placement = cls.placement(world, spr)
        mine = [pipe.build_stage(s, "cpu") for s in range(n_stages) if placement[s] == rank]
        sched = cls(mine[0] if spr == 1 and sched_name in SINGLE else mine, n_mb, loss_fn=loss_fn)
        first, last = placement[0] == rank, placement[-1] == rank
        losses: list[torch.Tensor] = []
        out = sched.step(*(args if first else ()), target=target if last else None, losses=losses, **(kwargs if first else {}))
        peak = float(sched.last_peak_live.get(rank, 0))
        ev = sched.eval(*(args if first else ()), **(kwargs if first else {}))
        key = f"{model_name}/{sched_name}/{spr}"
        r: dict[str, float] = {}
        if last:
            r["out"] = _max_err(out, out_ref)
            r["loss"] = abs(float(torch.stack(losses).mean() - loss_ref))
            r["eval"] = _max_err(ev, out_ref)
            r["n_losses"] = float(len(losses))
        ref_params = dict(ref.named_parameters(remove_duplicate=False))
        g_err, n_checked = 0.0, 0
        for st in mine:
            for name, p in st.submod.named_parameters(remove_duplicate=False):
                if ref_params[name].grad is None:  # the loss never reaches it
                    assert p.grad is None, f"{key}: {name} on rank {rank} has a grad, the plain model none"
                    continue
                assert p.grad is not None, f"{key}: no grad for {name} on rank {rank}"
                g_err = max(g_err, float((p.grad - ref_params[name].grad).abs().max()))
                n_checked += 1
        r["grad"] = g_err
        r["n_params"] = float(n_checked)
        r["peak_live"] = peak
        report[key] = r
        dist.barrier()
    return report


def readme_example(rank: int, world: int) -> float:
    """The PiPPy README flow: annotate_split_points, pipeline, PipelineStage, stage(x) / stage()."""
    torch.manual_seed(0)
    net = MyNetwork().double()
    ref = copy.deepcopy(net)
    pippy.annotate_split_points(net, {"layer0": SplitPoint.END, "layer1": SplitPoint.END})
    x = torch.randn(32, 16, dtype=torch.float64)
    pipe = pipeline(net, 4, example_args=(x,))
    stage = PipelineStage(pipe, rank, torch.device("cpu"))
    out = stage(x) if rank == 0 else stage()
    if rank == world - 1:
        return float((out - ref(x)).abs().max())
    assert out is None
    return 0.0


def error_cases(rank: int, world: int) -> dict[str, str]:
    """Errors under a real process group: wrong world size, and a peer that never answers (timeout)."""
    out: dict[str, str] = {}
    model, args, _, target, loss_fn, opts = build("mlp_spec", 3)
    pipe3 = pipeline(model, 2, example_args=args, **opts)
    try:
        pippy.Schedule1F1B(pipe3.build_stage(rank, "cpu"), 2, loss_fn=loss_fn)
    except pippy.StageError as exc:
        out["world"] = str(exc)
    model, args, _, target, loss_fn, opts = build("mlp_spec", 2)
    pipe = pipeline(model, 2, example_args=args, **opts)
    sched = pippy.ScheduleGPipe(pipe.build_stage(rank, "cpu"), 2, loss_fn=loss_fn, timeout=1.0)
    if rank == 1:  # rank 0 never calls step(): rank 1 must time out with a useful message, not hang
        try:
            sched.step(target=target)
        except pippy.PipeTimeoutError as exc:
            out["timeout"] = str(exc)
    else:
        time.sleep(4)  # stay connected while rank 1 times out (a timed-out gloo pair cannot be reused)
    return out

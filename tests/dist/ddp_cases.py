"""Spawned-rank cases for dp x pp with DDP on each stage (the DDP wrapper or torch's composable replicate), 2 x 2 gloo."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import pippy
from pippy.sim.cost import CostModel, StageCost
from pippy import SplitPoint, pipeline

SCHEDS = {"gpipe": (pippy.ScheduleGPipe, 1), "1f1b": (pippy.Schedule1F1B, 1),
          "interleaved_1f1b": (pippy.ScheduleInterleaved1F1B, 2), "zbh1": (pippy.ScheduleZBH1, 1),
          "zbv": (pippy.ScheduleZBV, 2)}
MODES = ("wrap", "replicate")


def _model(n_stages: int, out: int = 2) -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2 * n_stages - 1)],
                         nn.Linear(8, out)).double()


def reference_and_pipe(n: int, m: int, out: int = 2) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The seeded model of ``n`` stages: its plain copy with AdamW (the reference), and the model's pipe."""
    torch.manual_seed(0)
    model = _model(n, out)
    ref = copy.deepcopy(model)
    pipe = pipeline(model, m, (torch.zeros(8, 8, dtype=torch.float64),),
                    split_spec={str(2 * k + 1): SplitPoint.END for k in range(n - 1)})
    return ref, torch.optim.AdamW(ref.parameters(), lr=0.05), pipe


def _make_dp(stage: Any, mode: str, group: Any, calls: list[int]) -> None:
    """Make ``stage`` data parallel over ``group`` and count DDP's all-reduces (a counting comm hook)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def counted(state, bucket):  # type: ignore[no-untyped-def]  (DDP checks the annotation: none, or GradBucket)
        calls[0] += 1
        return allreduce_hook(state, bucket)

    if mode == "wrap":
        stage.submod = nn.parallel.DistributedDataParallel(stage.submod, process_group=group)
        stage.submod.register_comm_hook(group, counted)
    else:
        from torch.distributed._composable.replicate import replicate

        replicate(stage.submod, process_group=group)
        stage.submod.register_comm_hook(group, counted)


def dp_pp_ddp(rank: int, world: int, out_dir: str = "") -> dict[str, Any]:
    """Each mode x schedule x m in (2, 4): gathered grads vs the plain model; all-reduces per step; 3 AdamW steps."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    pp, dp = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    group = mesh["dp"].get_group()
    report: dict[str, Any] = {}
    for mode in MODES:
        for name, (cls, v) in SCHEDS.items():
            for m in (2, 4):
                n = 2 * v
                ref, ref_opt, pipe = reference_and_pipe(n, m)
                place = cls.placement(2, v)
                where = mesh if mode == "replicate" else mesh["pp"].get_group()  # the mesh itself: its "pp" dimension
                stages = [pipe.build_stage(s, "cpu", group=where) for s in range(n) if place[s] == pp]
                calls = [0]
                for st in stages:
                    _make_dp(st, mode, group, calls)
                opt = torch.optim.AdamW([p for st in stages for p in st.parameters()], lr=0.05)
                sched = cls(stages if v > 1 else stages[0], m, loss_fn=nn.MSELoss())
                grad_err, per_step = 0.0, []
                for step in range(3):
                    g = torch.Generator().manual_seed(100 + step)
                    X, Y = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
                    x, y = X.chunk(2)[dp], Y.chunk(2)[dp]  # each DP rank's share of the global batch
                    ref_opt.zero_grad()
                    nn.MSELoss()(ref(X), Y).backward()  # DDP averages over DP ranks: the global-batch mean
                    opt.zero_grad()
                    calls[0] = 0
                    sched.step(*((x,) if sched.holds(0) else ()), target=y if sched.holds(n - 1) else None)
                    per_step.append(calls[0])
                    if step == 0:
                        for st in stages:
                            for fqn, p in st.unwrapped.named_parameters():
                                grad_err = max(grad_err, float((p.grad - ref.get_parameter(fqn).grad).abs().max()))
                    opt.step()
                    ref_opt.step()
                param_err = max(float((p - ref.get_parameter(fqn)).detach().abs().max())
                                for st in stages for fqn, p in st.unwrapped.named_parameters())
                report[f"{mode}/{name}/{m}"] = {"grad_err": grad_err, "param_err": param_err, "allreduces": per_step,
                                                "stages": len(stages)}
    report["errors"] = _bad_input(mesh, pp, dp, group)
    if out_dir:
        report["traces"] = _trace_per_pipeline(mesh, pp, out_dir)
    dist.barrier()
    return report


def _trace_per_pipeline(mesh: Any, pp: int, out_dir: str) -> dict[str, str]:
    """trace="t.json" with two pipelines (dp 2): each pipeline's rank 0 writes its own file, named by its ranks."""
    import json
    import os

    torch.manual_seed(0)
    pipe = pipeline(_model(2), 2, (torch.zeros(8, 8, dtype=torch.float64),), split_spec={"1": SplitPoint.END})
    sched = pippy.Schedule1F1B(pipe.build_stage(pp, "cpu", group=mesh["pp"].get_group()), 2, loss_fn=nn.MSELoss(),
                               trace=os.path.join(out_dir, "t.json"))
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    sched.step(*((x,) if pp == 0 else ()), target=y if pp == 1 else None)
    dist.barrier()
    out = {}
    for f in sorted(os.listdir(out_dir)):
        if f.startswith("t."):
            with open(os.path.join(out_dir, f)) as fh:
                out[f] = json.dumps(json.load(fh))[:20000]
    return out


def _bad_input(mesh: Any, pp: int, dp: int, group: Any) -> dict[str, str]:
    """A mesh without the pipeline dimension; a pp group smaller than the pipe; DP ranks with different m."""
    out: dict[str, str] = {}
    pipe = pipeline(_model(2), 2, (torch.zeros(8, 8, dtype=torch.float64),), split_spec={"1": SplitPoint.END})
    try:
        pipe.build_stage(pp, "cpu", group=mesh, pp_dim="pipe")
        out["mesh"] = "no error"
    except ValueError as exc:
        out["mesh"] = str(exc)
    three = pipeline(_model(2), 2, (torch.zeros(8, 8, dtype=torch.float64),),
                     split_spec={"0": SplitPoint.END, "2": SplitPoint.END})
    try:
        pippy.Schedule1F1B(three.build_stage(pp, "cpu", group=mesh), 2, loss_fn=nn.MSELoss())
        out["pp_size"] = "no error"
    except pippy.StageError as exc:
        out["pp_size"] = str(exc)
    m = 2 if dp == 0 else 4  # this DP rank's micro-batch count differs from its peer's
    st = pipeline(_model(2), m, (torch.zeros(8, 8, dtype=torch.float64),),
                  split_spec={"1": SplitPoint.END}).build_stage(pp, "cpu", group=mesh)
    _make_dp(st, "wrap", group, [0])
    sched = pippy.Schedule1F1B(st, m, loss_fn=nn.MSELoss())
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    try:
        sched.step(*((x,) if pp == 0 else ()), target=y if pp == 1 else None)
        out["dp_m"] = "no error"
    except pippy.StageError as exc:
        out["dp_m"] = str(exc)
    # DP ranks given different costs= would order their W's (and DDP's reductions) differently: refused up front
    four = pipeline(_model(4), 4, (torch.zeros(8, 8, dtype=torch.float64),),
                    split_spec={str(2 * k + 1): SplitPoint.END for k in range(3)})
    place = pippy.ScheduleZBV.placement(2, 2)
    mine = [four.build_stage(s, "cpu", group=mesh["pp"].get_group()) for s in range(4) if place[s] == pp]
    for st in mine:
        _make_dp(st, "wrap", group, [0])
    heavy = CostModel(stages=[StageCost(f=1, i=1, w=1, fused_b=1.5)] * 3 + [StageCost(f=3, i=3, w=2, fused_b=4.5)])
    sched = pippy.ScheduleZBV(mine, 4, loss_fn=nn.MSELoss(), costs=heavy if dp == 1 else None)
    try:
        sched.step(*((x,) if pp == 0 else ()), target=y if pp == 0 else None)
        out["dp_costs"] = "no error"
    except pippy.StageError as exc:
        out["dp_costs"] = str(exc)
    return out

"""Checkpoint cases on 2 gloo ranks: each rank saves and loads its own stages; a resumed run equals the uninterrupted one.

The uninterrupted reference runs in each rank's own process (``LocalPipeline``, every stage): pippy
gives bitwise the same float64 numbers for any split, schedule and placement.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from models import SharedEnds, mse, train_steps
from torch import nn

import pippy
from pippy import SplitPoint, checkpoint, pipe_split, pipeline
from pippy.runtime.comm import PipeTimeoutError
from pippy.runtime.local import LocalPipeline

X = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
Y = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
LR = {str(i): 0.01 * (i + 1) for i in range(4)}  # layer i trains with lr 0.01 * (i + 1)


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(4, 4) for _ in range(4))).double()


def _spec(n_stages: int) -> dict[str, SplitPoint]:
    return {str(i): SplitPoint.END for i in range(4 // n_stages - 1, 3, 4 // n_stages)}


def _layer_groups(stages: list[Any], lr: float | None = None) -> list[dict[str, Any]]:
    """One group per layer, in the order this rank holds them (``lr``: a wrong start for the load to fix)."""
    return [{"params": list(st.submod.get_submodule(layer).parameters()), "lr": LR[layer] if lr is None else lr,
             "layer": layer}
            for st in stages for layer in sorted({n.split(".")[0] for n, _ in st.submod.named_parameters()})]


def _reference(model: nn.Module, make_opts: Callable[[list[Any]], list[torch.optim.Optimizer]], steps: int,
               **pipe_kw: Any) -> dict[str, torch.Tensor]:
    lp = LocalPipeline(pipeline(copy.deepcopy(model), 2, (X,), **pipe_kw), pippy.ScheduleZBV, num_ranks=2,
                       n_microbatches=2, loss_fn=mse)
    train_steps(lp, make_opts(lp.stages), steps, X, Y)
    return {f"{st.index}:{k}": v.clone() for st in lp.stages for k, v in st.state_dict().items()}


def _rank_run(rank: int, model: nn.Module, n_stages: int, cls: type, **pipe_kw: Any) -> tuple[list[Any], Any]:
    pipe = pipeline(copy.deepcopy(model), 2, (X,), **pipe_kw)
    place = cls.placement(2, n_stages // 2)
    mine = [pipe.build_stage(s, "cpu") for s in range(n_stages) if place[s] == rank]
    return mine, cls(mine if len(mine) > 1 else mine[0], 2, loss_fn=mse)


def _train(sched: Any, opts: list[torch.optim.Optimizer], n_stages: int, steps: int) -> None:
    for _ in range(steps):
        for o in opts:
            o.zero_grad()
        sched.step(*((X,) if sched.holds(0) else ()), target=Y if sched.holds(n_stages - 1) else None)
        for o in opts:
            o.step()


def _diff(mine: list[Any], want: dict[str, torch.Tensor]) -> float:
    return max(float((v - want[f"{st.index}:{k}"]).abs().max()) for st in mine for k, v in st.state_dict().items())


def _placement_or_split(rank: int, where: str, fmt: str, saved_stages: int) -> dict[str, Any]:
    """Save from interleaved 1F1B (4 stages) or 1F1B (2 stages), resume into ZB-V's placement of 4 stages."""
    want = _reference(_mlp(0), lambda sts: [torch.optim.SGD(_layer_groups(sts), lr=0.0, momentum=0.9)], 4,
                      split_spec=_spec(4))
    cls = pippy.ScheduleInterleaved1F1B if saved_stages == 4 else pippy.Schedule1F1B
    mine, sched = _rank_run(rank, _mlp(0), saved_stages, cls, split_spec=_spec(saved_stages))
    opt = torch.optim.SGD(_layer_groups(mine), lr=0.0, momentum=0.9)
    _train(sched, [opt], saved_stages, 2)
    checkpoint.save(mine, where, format=fmt, optimizer=opt)
    mine, sched = _rank_run(rank, _mlp(1), 4, pippy.ScheduleZBV, split_spec=_spec(4))
    opt = torch.optim.SGD(_layer_groups(mine, lr=0.5), lr=0.0, momentum=0.9)
    checkpoint.load(mine, where, optimizer=opt)
    layer = {id(p): n.split(".")[0] for st in mine for n, p in st.submod.named_parameters()}
    lrs_ok = all(g["lr"] == LR[layer[id(g["params"][0])]] == LR[g["layer"]] for g in opt.param_groups)
    _train(sched, [opt], 4, 2)
    return {"lrs_ok": lrs_ok, "diff": _diff(mine, want)}


def _per_stage_calls(rank: int, where: str) -> dict[str, Any]:
    """One Adam per stage, one DCP save call per stage (rank 0: stages 0 then 3; rank 1: 1 then 2), over an older save
    of every stage at once into the same directory, whose sub-directory the last call removes."""
    def adams(sts: list[Any]) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(st.parameters(), lr=1e-2) for st in sts]

    want = _reference(_mlp(0), adams, 4, split_spec=_spec(4))
    at_save = _reference(_mlp(0), adams, 2, split_spec=_spec(4))
    mine, sched = _rank_run(rank, _mlp(0), 4, pippy.ScheduleZBV, split_spec=_spec(4))
    opts = adams(mine)
    _train(sched, opts, 4, 2)
    checkpoint.save(mine, where, format="dcp")  # every stage at once first: <where>/dcp, stale after the calls below
    for st, o in zip(mine, opts):
        checkpoint.save([st], where, format="dcp", optimizer=o)
    merged = checkpoint.merge(where)
    merged_ok = sorted(merged) == sorted(_mlp(0).state_dict()) and all(
        torch.equal(merged[k.split(":", 1)[1]], v) for k, v in at_save.items())
    subdirs = sorted(d for d in os.listdir(where) if d.startswith("dcp"))
    merged_ok &= subdirs == ["dcp_optim_stages_0_1", "dcp_optim_stages_2_3", "dcp_stages_0_1", "dcp_stages_2_3"]
    mine, sched = _rank_run(rank, _mlp(1), 4, pippy.ScheduleZBV, split_spec=_spec(4))
    opts = adams(mine)
    for st, o in zip(mine, opts):
        checkpoint.load([st], where, optimizer=o)
    _train(sched, opts, 4, 2)
    return {"lrs_ok": merged_ok, "diff": _diff(mine, want)}


def _shared_fqn(rank: int, where: str) -> dict[str, Any]:
    """``shared`` in stages 0 and 3 (both on rank 0): after a DCP load each copy has its own Adam state."""
    torch.manual_seed(0)
    base = SharedEnds().double()

    def adam(sts: list[Any]) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam([p for st in sts for p in st.parameters()], lr=1e-2)]

    want = _reference(base, adam, 5)
    mine, sched = _rank_run(rank, base, 4, pippy.ScheduleZBV)
    opts = adam(mine)
    _train(sched, opts, 4, 2)
    checkpoint.save(mine, where, format="dcp", optimizer=opts[0])
    torch.manual_seed(1)
    mine, sched = _rank_run(rank, SharedEnds().double(), 4, pippy.ScheduleZBV)
    opts = adam(mine)
    checkpoint.load(mine, where, optimizer=opts[0])
    owned = [opts[0].state[st.submod.get_parameter("shared.weight")]["exp_avg"].data_ptr()
             for st in mine if "shared.weight" in st.state_dict()]
    _train(sched, opts, 4, 3)
    return {"lrs_ok": len(set(owned)) == len(owned), "diff": _diff(mine, want)}


def _missing_on_one_rank(rank: int, where: str) -> dict[str, Any]:
    """Rank 1's stage wants an FQN the DCP checkpoint lacks: both ranks raise at once, naming rank 1 and the FQN; then
    a load on rank 0 alone times out naming rank 1."""
    mine, _sched = _rank_run(rank, _mlp(0), 4, pippy.ScheduleZBV, split_spec=_spec(4))
    checkpoint.save(mine, where, format="dcp")
    if rank == 1:
        mine[0].submod.register_buffer("extra", torch.zeros(2))
    start, error = time.monotonic(), None
    try:
        checkpoint.load(mine, where)
    except KeyError as err:
        error = str(err)
    out = {"error": error, "secs": time.monotonic() - start, "alone": None}
    if rank == 0:  # a load rank 1 never makes (the last of this group): rank 0 stops after pippy's timeout, saying so
        os.environ["PIPPY_TIMEOUT"], was = "1", os.environ["PIPPY_TIMEOUT"]
        try:
            checkpoint.load(mine, where)
        except PipeTimeoutError as err:
            out["alone"] = str(err)
        finally:
            os.environ["PIPPY_TIMEOUT"] = was
    return out


def resume_cases(rank: int, world: int, root: str) -> dict[str, dict[str, Any]]:
    """Every case on both ranks; per case whether the learning rates (or merge, or own state) are right, and the diff."""
    out: dict[str, dict[str, Any]] = {}
    for fmt in ("torch", "dcp"):
        out[f"placement/{fmt}"] = _placement_or_split(rank, os.path.join(root, f"placement_{fmt}"), fmt, 4)
    out["resplit/dcp"] = _placement_or_split(rank, os.path.join(root, "resplit"), "dcp", 2)
    out["per_stage_calls/dcp"] = _per_stage_calls(rank, os.path.join(root, "per_stage"))
    out["shared_fqn/dcp"] = _shared_fqn(rank, os.path.join(root, "shared"))
    out["missing_on_one_rank"] = _missing_on_one_rank(rank, os.path.join(root, "missing"))
    dist.barrier()
    return out


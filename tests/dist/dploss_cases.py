"""Spawned-rank cases for pp 2 × dp 2: mean, sum (also by step(loss_kwargs=)) and counted-mean losses give the global batch's gradients (DDP, FSDP2, HSDP)."""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
import torch.distributed as dist
from ddp_cases import _model as _dp_model
from ddp_cases import reference_and_pipe
from torch import nn

import pippy
from pippy import SplitPoint, pipeline

SCHEDS = {"1f1b": (pippy.Schedule1F1B, 1), "zbv": (pippy.ScheduleZBV, 2)}
WRAPS = ("ddp", "fsdp", "hsdp", "fsdp_divide_1")  # the last: FSDP2 told to sum (set_gradient_divide_factor(1))
_WEIGHT = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
LOSSES: dict[str, tuple[Any, str | None]] = {  # name: (loss_fn, loss_reduction=)
    "mean": (nn.MSELoss(), None),
    "sum": (nn.MSELoss(reduction="sum"), None),
    "sum_given": (lambda out, y: ((out - y) ** 2).sum(), "sum"),  # a plain function told it sums
    "counted": (nn.CrossEntropyLoss(), None),  # ignore_index padding, all on DP rank 0's share
    "counted_weighted": (functools.partial(nn.functional.cross_entropy, weight=_WEIGHT), None),
    "own_counted": (None, None),  # the model's own F.cross_entropy(ignore_index padding): made exact by pippy
    "own_weighted": (None, None),  # the same with class weights (a buffer): the mean divides by summed weights
    "sum_kwargs": (nn.functional.mse_loss, None),  # a mean loss_fn, summed by step(loss_kwargs=) (LOSS_KWARGS)
}
LOSS_KWARGS: dict[str, dict[str, Any]] = {"sum_kwargs": {"reduction": "sum"}}


class _OwnLoss(nn.Module):
    """The model returning its own mean loss over counted targets, as a Hugging Face model given ``labels=``."""

    def __init__(self, body: nn.Module, weight: torch.Tensor | None) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("cw", weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.body(x), labels, weight=self.cw)


def _own_reference_and_pipe(n: int, m: int, weighted: bool) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = _OwnLoss(_model(n), _WEIGHT.clone() if weighted else None)
    ref = copy.deepcopy(model)
    example = (torch.zeros(8, 8, dtype=torch.float64), torch.zeros(8, dtype=torch.int64))
    pipe = pipeline(model, m, example, split_spec={f"body.{2 * k + 1}": SplitPoint.END for k in range(n - 1)})
    return ref, torch.optim.AdamW(ref.parameters(), lr=0.05), pipe


def _model(n_stages: int) -> nn.Module:
    return _dp_model(n_stages, out=4)


def _batch(loss: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (16 rows): DP rank r takes rows 8r..8r+7. Class targets: 6 of rank 0's 8 rows are padding."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64)
    if not loss.startswith(("counted", "own_")):
        return x, torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=g)
    y[1:7] = -100  # uneven padding across DP ranks and micro-batches
    return x, y


def _wrap(stage: Any, wrap: str, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    if wrap == "ddp":
        stage.submod = nn.parallel.DistributedDataParallel(stage.submod, process_group=mesh["shard"].get_group())
    elif wrap.startswith("fsdp"):
        fully_shard(stage.submod, mesh=mesh["shard"])
        if wrap == "fsdp_divide_1":
            stage.submod.set_gradient_divide_factor(1.0)
    else:  # HSDP: a 2-D (replicate, shard) mesh
        fully_shard(stage.submod, mesh=mesh["rep", "shard"])


def _grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def _global_loss(name: str, losses: list[torch.Tensor], counts: list[torch.Tensor], group: Any) -> float:
    """The global batch's loss from this DP rank's ``losses`` (as the README says to combine them)."""
    if name.startswith(("counted", "own_")):
        part = torch.stack([(loss * c).nan_to_num() for loss, c in zip(losses, counts)]).sum()
        both = torch.stack([part, torch.stack(counts).sum().to(part.dtype)])
        dist.all_reduce(both, group=group)
        return float(both[0] / both[1])
    local = torch.stack(losses).sum() if name.startswith("sum") else torch.stack(losses).mean()
    dist.all_reduce(local, group=group)
    return float(local) if name.startswith("sum") else float(local) / dist.get_world_size(group)


def dp_losses(rank: int, world: int) -> dict[str, Any]:
    """wrap × schedule × loss: gradients, 2 AdamW steps and the combined losses vs one process on the global batch."""
    from torch.distributed.device_mesh import init_device_mesh

    from pippy.runtime.countedmean import counted_mean

    mesh = init_device_mesh("cpu", (1, 2, 2), mesh_dim_names=("rep", "shard", "pp"))
    pp, dp = mesh["pp"].get_local_rank(), mesh["shard"].get_local_rank()
    report: dict[str, Any] = {}
    m = 4
    for wrap in WRAPS:
        for sname, (cls, v) in SCHEDS.items():
            for lname, (loss_fn, given) in LOSSES.items():
                n = 2 * v
                own = lname.startswith("own_")
                ref, ref_opt, pipe = (_own_reference_and_pipe(n, m, lname == "own_weighted") if own
                                      else reference_and_pipe(n, m, out=4))
                place = cls.placement(2, v)
                stages = [pipe.build_stage(s, "cpu", group=mesh["pp"].get_group()) for s in range(n) if place[s] == pp]
                for st in stages:
                    _wrap(st, wrap, mesh)
                opt = torch.optim.AdamW([p for st in stages for p in st.parameters()], lr=0.05)
                sched = cls(stages if v > 1 else stages[0], m, loss_fn=loss_fn, loss_reduction=given)
                grad_err = loss_err = 0.0
                for step in range(2):
                    X, Y = _batch(lname, step)
                    x, y = X.chunk(2)[dp], Y.chunk(2)[dp]
                    ref_opt.zero_grad()
                    kw = LOSS_KWARGS.get(lname)
                    ref_loss = ref(X, Y) if own else loss_fn(ref(X), Y, **(kw or {}))
                    ref_loss.backward()
                    opt.zero_grad()
                    losses: list[torch.Tensor] = []
                    if own:  # the labels are the model's input
                        sched.step(*((x, y) if sched.holds(0) else ()), losses=losses)
                    else:
                        sched.step(*((x,) if sched.holds(0) else ()), target=y if sched.holds(n - 1) else None,
                                   losses=losses, loss_kwargs=kw)
                    for st in stages:
                        for fqn, p in st.unwrapped.named_parameters():
                            grad_err = max(grad_err, float((_grad(p) - ref.get_parameter(fqn).grad).abs().max()))
                    if sched.holds(n - 1):
                        cm = counted_mean(nn.CrossEntropyLoss(weight=ref.cw) if own else loss_fn)
                        counted = lname.startswith("counted") or own
                        counts = [cm.count(t) for t in y.chunk(m)] if counted and cm else []
                        got = _global_loss(lname, losses, counts, mesh["shard"].get_group())
                        loss_err = max(loss_err, abs(got - float(ref_loss.detach())))
                    opt.step()
                    ref_opt.step()
                param_err = max(float((_full(p) - ref.get_parameter(fqn)).detach().abs().max())
                                for st in stages for fqn, p in st.unwrapped.named_parameters())
                report[f"{wrap}/{sname}/{lname}"] = {"grad_err": grad_err, "param_err": param_err,
                                                     "loss_err": loss_err}
    report["hsdp_mismatch"] = _hsdp_mismatch(mesh, pp, dp)
    report["profile"] = _profile_flow(mesh, pp)
    dist.barrier()
    return report


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _hsdp_mismatch(mesh: Any, pp: int, dp: int) -> str:
    """HSDP stages whose DP ranks run different micro-batch counts: refused before the first step, not a hang."""
    m = 2 if dp == 0 else 4
    pipe = pipeline(_model(1), m, (torch.zeros(8, 8, dtype=torch.float64),), split_spec={"0": SplitPoint.END})
    st = pipe.build_stage(pp, "cpu", group=mesh["pp"].get_group())
    _wrap(st, "hsdp", mesh)
    sched = pippy.Schedule1F1B(st, m, loss_fn=nn.MSELoss())
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    try:
        sched.step(*((x,) if pp == 0 else ()), target=y if pp == 1 else None)
        return "no error"
    except pippy.StageError as exc:
        return str(exc)


def _profile_flow(mesh: Any, pp: int) -> dict[str, Any]:
    """README's flow: each DP replica profiles its pipeline (group=mesh), then ZB-V with costs= under FSDP2."""
    from torch.distributed.fsdp import fully_shard

    from pippy.sim.profile import profile_ranks

    torch.manual_seed(0)
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    pipe = pipeline(_model(2), 4, (x,), split_spec={str(k): SplitPoint.END for k in range(3)})
    place = pippy.ScheduleZBV.placement(2, 2)
    pp_mesh = mesh["shard", "pp"]  # a mesh with a "pp" dimension: every other dimension is data parallel
    try:
        costs = profile_ranks(pipe, (x,), place, group=pp_mesh, loss_fn=nn.MSELoss(), target=y, repeats=1, warmup=0)
    except Exception as exc:  # noqa: BLE001 - reported, then asserted on in the test
        return {"costs": "", "error": f"profile_ranks: {type(exc).__name__}: {exc}"}
    stages = [pipe.build_stage(s, "cpu", group=mesh["pp"].get_group()) for s in range(4) if place[s] == pp]
    for st in stages:
        fully_shard(st.submod, mesh=mesh["shard"])
    sched = pippy.ScheduleZBV(stages, 4, loss_fn=nn.MSELoss(), costs=costs)
    try:
        sched.step(*((x,) if sched.holds(0) else ()), target=y if sched.holds(3) else None)
        error = ""
    except pippy.StageError as exc:
        error = str(exc).splitlines()[0]
    return {"costs": repr(costs), "error": error}

"""Spawned-rank cases for the PiPPy face: ManualPipelineStage under every schedule family, PipelineStage keyword forms."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import pippy
from pippy import ManualPipelineStage, PipelineStage, SplitPoint, pipeline
from pippy.PipelineSchedule import ScheduleGPipe

D, B, M = 6, 8, 4
SCHEDULES = {  # name -> (class, stages per rank)
    "gpipe": (pippy.ScheduleGPipe, 1),
    "1f1b": (pippy.Schedule1F1B, 1),
    "zbh1": (pippy.ScheduleZBH1, 1),
    "interleaved_1f1b": (pippy.ScheduleInterleaved1F1B, 2),
    "looped_bfs": (pippy.ScheduleLoopedBFS, 2),
    "zbv": (pippy.ScheduleZBV, 2),
}


def _chain(n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    parts: list[nn.Module] = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(n - 1)]
    return [*parts, nn.Linear(D, 2)]


def _grad_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max(float((got[k] - ref[k]).abs().max()) for k in got)


def manual_stages(rank: int, world: int) -> dict[str, Any]:
    """Each schedule over hand-cut stages (the user's own modules): loss, output and grads equal the plain model."""
    torch.set_default_dtype(torch.float64)
    x, y = torch.randn(B, D, generator=torch.Generator().manual_seed(1)), torch.randn(B, 2, generator=torch.Generator().manual_seed(2))
    loss_fn = nn.MSELoss(reduction="sum")
    report: dict[str, Any] = {}
    for name, (cls, v) in SCHEDULES.items():
        n = world * v
        parts = _chain(n)
        ref = nn.Sequential(*copy.deepcopy(parts))
        ref_loss = loss_fn(ref(x), y)
        ref_loss.backward()
        place = cls.placement(world, v)
        mine = [s for s in range(n) if place[s] == rank]
        stages = []
        for s in mine:
            example = torch.empty(B // M, D)  # one micro-batch's input (only its shape and dtype are read)
            stages.append(ManualPipelineStage(parts[s], s, n, "cpu", M, input_args=example))
        sched = cls(stages if v > 1 else stages[0], M, loss_fn=loss_fn)
        first, last = 0 in mine, n - 1 in mine
        losses: list[torch.Tensor] = []
        out = sched.step(*((x,) if first else ()), target=y if last else None, losses=losses)
        errs = []
        for s in mine:
            got = {k: p.grad for k, p in parts[s].named_parameters()}
            errs.append(_grad_err(got, {k: p.grad for k, p in ref[s].named_parameters()}))
        entry = {"grad_err": max(errs)}
        if last:
            entry["loss_err"] = abs(float(torch.stack(losses).sum()) - float(ref_loss))
            entry["out_err"] = float((out - ref(x)).abs().max())
        report[name] = entry
    return report


def manual_mismatch(rank: int, world: int) -> str:
    """Stage 1 built for another input width than stage 0 sends: every rank gets an error naming the pair."""
    parts = _chain(2)
    wrong = torch.empty(B // M, D + 1) if rank == 1 else torch.empty(B // M, D)
    stage = ManualPipelineStage(nn.Linear(D + 1, 2) if rank == 1 else parts[0], rank, 2, "cpu", M, input_args=wrong)
    try:
        ScheduleGPipe(stage, M, loss_fn=nn.MSELoss())
    except ValueError as exc:
        return str(exc)
    return "no error"


def keyword_forms(rank: int, world: int) -> dict[str, float]:
    """``PipelineStage(pipe, stage_index=..., device=..., group=...)`` and the schedule's step/eval, as PiPPy's tests call them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 2)).double()
    x = torch.randn(B, D, dtype=torch.float64)
    pipe = pipeline(model, M, example_args=(x,), split_spec={"1": SplitPoint.END})
    stage = PipelineStage(pipe, stage_index=rank, device=torch.device("cpu"), group=dist.group.WORLD)
    sched = ScheduleGPipe(stage, n_microbatches=M)
    out = sched.step(x) if rank == 0 else sched.step()
    ev = sched.eval(x) if rank == 0 else sched.eval()
    if rank != world - 1:
        return {}
    return {"step": float((out - model(x)).abs().max()), "eval": float((ev - model(x)).abs().max())}


def stage_shapes(rank: int, world: int) -> dict[str, Any]:
    """PiPPy's shape helpers: ``get_stage_shapes`` dry-runs the chain across ranks; ``validate_stage_shapes`` checks it."""
    from pippy.ManualPipelineStage import get_stage_shapes, validate_stage_shapes

    n = 2 * world
    torch.manual_seed(0)
    parts: list[nn.Module] = [nn.Linear(D + k, D + k + 1) for k in range(n)]  # widths grow by one per stage
    mine = [s for s in range(n) if s % world == rank]
    shapes = get_stage_shapes([parts[s] for s in mine], mine, n, rank, world, "cpu", microbatch=torch.ones(B // M, D))
    stages = [ManualPipelineStage(parts[s], s, n, "cpu", M, input_args=torch.empty(B // M, D + s)) for s in mine]
    validate_stage_shapes(stages)
    bad = [ManualPipelineStage(parts[s], s, n, "cpu", M, input_args=torch.empty(B // M, D + s + (s == 1)),
                               output_args=torch.empty(B // M, D + s + 1)) for s in mine]
    try:
        validate_stage_shapes(bad)
        error = "no error"
    except ValueError as exc:
        error = str(exc)
    return {"shapes": {s: [list(map(list, v["inputs"])), list(map(list, v["outputs"]))] for s, v in shapes.items()},
            "error": error}


def titan_form(rank: int, world: int) -> dict[str, float]:
    """torchtitan's flow: stage modules cut by hand on the meta device, PyTorch pipelining's
    ``PipelineStage(module, index, num_stages, device, input_args=, group=)``, then ``to_empty`` and weights,
    the class picked by name and dispatched by ``issubclass(cls, PipelineScheduleMulti)``, a loss rescaled by
    the micro-batch count with ``scale_grads=False``."""
    torch.set_default_dtype(torch.float64)
    x, y = torch.randn(B, D, generator=torch.Generator().manual_seed(1)), torch.randn(B, 2, generator=torch.Generator().manual_seed(2))
    report: dict[str, float] = {}
    for name in ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble"):
        cls = pippy.get_schedule_class(name)
        v = 2 if issubclass(cls, pippy.PipelineScheduleMulti) else 1
        n = world * v
        parts = _chain(n)
        ref = nn.Sequential(*copy.deepcopy(parts))
        nn.functional.mse_loss(ref(x), y).backward()
        place = cls.placement(world, v)
        stages, mods = [], []
        for s in [s for s in range(n) if place[s] == rank]:
            with torch.device("meta"):
                mod = _chain(n)[s]
            example = torch.empty(B // M, D, device="meta")
            stages.append(PipelineStage(mod, s, n, "cpu", input_args=example, group=dist.group.WORLD))
            mod.to_empty(device="cpu")
            mod.load_state_dict(parts[s].state_dict())
            mods.append((s, mod))

        def rescaled(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
            return nn.functional.mse_loss(out, tgt) / M

        sched = cls(stages if v > 1 else stages[0], n_microbatches=M, loss_fn=rescaled, scale_grads=False)
        first, last = any(s == 0 for s, _ in mods), any(s == n - 1 for s, _ in mods)
        losses: list[torch.Tensor] = []
        sched.step(*((x,) if first else ()), target=y if last else None, losses=losses)
        report[name] = max(_grad_err({k: p.grad for k, p in mod.named_parameters()},
                                     {k: p.grad for k, p in ref[s].named_parameters()}) for s, mod in mods)
        if last:
            report[name + " loss"] = abs(float(torch.stack(losses).sum()) - float(nn.functional.mse_loss(ref(x), y)))
    return report


class _Scaled(nn.Module):
    """A stage reading a keyword input (torchtitan passes masks and the like to every stage's step())."""

    def __init__(self, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(D, d_out)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)) * scale


def lazy_form(rank: int, world: int) -> dict[str, float]:
    """``PipelineStage(module, index, num_stages, device)`` without input_args: shapes learned in the first step,
    on modules built on the meta device and filled afterwards, with each rank's keyword inputs for its stages."""
    torch.set_default_dtype(torch.float64)
    x, y = torch.randn(B, D, generator=torch.Generator().manual_seed(1)), torch.randn(B, 2, generator=torch.Generator().manual_seed(2))
    scale = torch.rand(B, 1, generator=torch.Generator().manual_seed(3)) + 0.5
    report: dict[str, float] = {}
    for name in ("1F1B", "ZBVZeroBubble", "InterleavedZeroBubble"):
        cls = pippy.get_schedule_class(name)
        v = 2 if issubclass(cls, pippy.PipelineScheduleMulti) else 1
        n = world * v
        torch.manual_seed(0)
        parts = [_Scaled(D if s < n - 1 else 2) for s in range(n)]
        ref_out = x
        for part in parts:
            ref_out = part(ref_out, scale=scale)
        ref = [p for part in parts for p in part.parameters()]
        ref_loss = nn.functional.mse_loss(ref_out, y)
        ref_grads = torch.autograd.grad(ref_loss, ref)
        ref_out = ref_out.detach()
        place = cls.placement(world, v)
        stages, mods = [], []
        for s in [s for s in range(n) if place[s] == rank]:
            with torch.device("meta"):
                mod = _Scaled(D if s < n - 1 else 2)
            stages.append(PipelineStage(mod, s, n, "cpu", group=dist.group.WORLD))
            mod.to_empty(device="cpu")
            mod.load_state_dict(parts[s].state_dict())
            mods.append((s, mod))
        sched = cls(stages if v > 1 else stages[0], M, loss_fn=nn.functional.mse_loss)
        first, last = any(s == 0 for s, _ in mods), any(s == n - 1 for s, _ in mods)
        out = sched.step(*((x,) if first else ()), target=y if last else None, scale=scale)
        grads = dict(zip([f"{s}.{k}" for s, part in enumerate(parts) for k, _ in part.named_parameters()], ref_grads))
        report[name] = max(float((p.grad - grads[f"{s}.{k}"]).abs().max()) for s, mod in mods
                           for k, p in mod.named_parameters())
        evaluated = sched.eval(*((x,) if first else ()), scale=scale)
        if last:
            report[name + " out"] = float((out - ref_out).abs().max())
            report[name + " eval"] = float((evaluated - ref_out).abs().max())
    return report


def lazy_side_effects(rank: int, world: int) -> int:
    """Learning the shapes in the first step leaves no trace: batch norm counts only the step's micro-batches."""
    torch.manual_seed(0)
    mod: nn.Module = nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D)) if rank == 0 else nn.Linear(D, 2)
    stage = PipelineStage(mod, rank, world, "cpu")
    sched = pippy.Schedule1F1B(stage, M, loss_fn=nn.functional.mse_loss)
    x, y = torch.randn(B, D), torch.randn(B, 2)
    sched.step(*((x,) if rank == 0 else ()), target=y if rank == world - 1 else None)
    return int(mod[1].num_batches_tracked) if rank == 0 else -1


class _Biased(_Scaled):
    def forward(self, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, scale) + bias[: self.lin.out_features]


def lazy_specs(rank: int, world: int) -> float:
    """PyTorch pipelining's chunk specs on a schedule of hand-cut stages: an unbatched keyword input replicated."""
    from torch.distributed.pipelining.microbatch import TensorChunkSpec as TorchChunkSpec
    from torch.distributed.pipelining.microbatch import _Replicate

    torch.set_default_dtype(torch.float64)
    x, y = torch.randn(B, D, generator=torch.Generator().manual_seed(1)), torch.randn(B, 2, generator=torch.Generator().manual_seed(2))
    scale = torch.rand(B, 1, generator=torch.Generator().manual_seed(3)) + 0.5
    bias = torch.randn(D, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    parts = [_Biased(D if s < world - 1 else 2) for s in range(world)]
    out = x
    for part in parts:
        out = part(out, scale=scale, bias=bias)
    grads = torch.autograd.grad(nn.functional.mse_loss(out, y), list(parts[rank].parameters()))
    stage = PipelineStage(copy.deepcopy(parts[rank]), rank, world, "cpu")
    sched = pippy.Schedule1F1B(stage, M, loss_fn=nn.functional.mse_loss, args_chunk_spec=(TorchChunkSpec(0),),
                               kwargs_chunk_spec={"scale": TorchChunkSpec(0), "bias": _Replicate()})
    sched.step(*((x,) if rank == 0 else ()), target=y if rank == world - 1 else None, scale=scale, bias=bias)
    return max(float((p.grad - g).abs().max()) for p, g in zip(stage.submod.parameters(), grads))


def lazy_mismatch(rank: int, world: int) -> tuple[str, float]:
    """Stage 1 cannot take what stage 0 gives: it fails learning its shapes, and rank 0 stops at once."""
    import time

    mod = nn.Linear(D, D) if rank == 0 else nn.Linear(D + 1, 2)
    sched = pippy.Schedule1F1B(PipelineStage(mod, rank, world, "cpu"), M, loss_fn=nn.functional.mse_loss)
    start = time.monotonic()
    try:
        sched.step(*((torch.randn(B, D),) if rank == 0 else ()), target=torch.randn(B, 2) if rank == 1 else None)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", time.monotonic() - start
    return "ok", time.monotonic() - start


def autocast_steps(rank: int, world: int) -> float:
    """Hand-cut stages built outside autocast, stepped under bf16 autocast: they learn the dtypes autocast sends,
    and grads equal the same micro-batches run under autocast without a pipeline."""
    x, y = torch.randn(B, D, generator=torch.Generator().manual_seed(1)), torch.randn(B, 2, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    parts = [nn.Sequential(nn.Linear(D, D), nn.Tanh()), nn.Linear(D, 2)]
    ref = copy.deepcopy(parts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for xm, ym in zip(x.chunk(M), y.chunk(M)):
            (nn.functional.mse_loss(ref[1](ref[0](xm)).float(), ym) / M).backward()
    mod = parts[rank]
    stage = PipelineStage(mod, rank, world, "cpu", input_args=torch.empty(B // M, D))
    sched = pippy.Schedule1F1B(stage, M, loss_fn=lambda out, tgt: nn.functional.mse_loss(out.float(), tgt))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None)
    return max(float((p.grad - q.grad).abs().max()) for p, q in zip(mod.parameters(), ref[rank].parameters()))


class _Gated(nn.Module):
    """Returns ``h`` without a gate and ``(h, gate)`` with one: another output count than its first step's."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> Any:
        h = torch.tanh(self.lin(x))
        return (h, gate) if gate is not None else h


def changed_outputs(rank: int, world: int) -> list[str]:
    """A hand-cut stage that returns more outputs than at its first step is refused, not cut back silently."""
    mod = _Gated() if rank == 0 else nn.Linear(D, 2)
    sched = pippy.Schedule1F1B(PipelineStage(mod, rank, world, "cpu"), M, loss_fn=nn.functional.mse_loss)
    said = []
    for gate in (None, torch.ones(B, D)):
        try:
            if rank == 0:
                sched.step(torch.randn(B, D), **({} if gate is None else {"gate": gate}))
            else:
                sched.step(target=torch.randn(B, 2))
            said.append("ok")
        except Exception as exc:
            said.append(f"{type(exc).__name__}: {exc}")
    return said


def learned_then_smaller(rank: int, world: int) -> str:
    """Shapes learned at the first step; a smaller batch later is refused, saying the shapes were learned."""
    mod = nn.Linear(D, D) if rank == 0 else nn.Linear(D, 2)
    sched = pippy.Schedule1F1B(PipelineStage(mod, rank, world, "cpu"), M, loss_fn=nn.functional.mse_loss)
    sched.step(*((torch.randn(B, D),) if rank == 0 else ()), target=torch.randn(B, 2) if rank == 1 else None)
    if rank == 1:
        return "ok"
    try:
        sched.step(torch.randn(B // 2, D))
    except ValueError as exc:
        return str(exc)
    return "ran"

"""Spawned-rank cases for dp x pp with FSDP2 on each stage (root ``fully_shard``), on a 2 x 2 gloo mesh."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import pippy
from pippy import SplitPoint, pipeline

SCHEDS = {"gpipe": (pippy.ScheduleGPipe, 1), "1f1b": (pippy.Schedule1F1B, 1),
          "interleaved_1f1b": (pippy.ScheduleInterleaved1F1B, 2), "looped_bfs": (pippy.ScheduleLoopedBFS, 2),
          "zbh1": (pippy.ScheduleZBH1, 1), "zbv": (pippy.ScheduleZBV, 2),  # split backward too
          "dualpipev": (pippy.ScheduleDualPipeV, 2)}
MS = {"dualpipev": (4, 8)}  # micro-batch counts per schedule (DualPipeV needs m >= 2p - 1)
BLOCKWISE = ("1f1b", "interleaved_1f1b", "zbv")  # fully_shard per block and per stage root


def _count_reductions() -> list[int]:
    """Count FSDP2's gradient reductions (one call per FSDP module that reduces)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg

    calls = [0]
    inner = pg.foreach_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return inner(*args, **kwargs)

    pg.foreach_reduce = counted
    return calls


def _checkpoint_round_trip(stages: list[Any], model: nn.Module, where: str) -> dict[str, float]:
    """Save the sharded stages with DCP, merge to a plain state dict (strict load), load back into the stages."""
    from pippy import checkpoint

    params = [p for st in stages for p in st.submod.parameters()]
    opt = torch.optim.AdamW(params, lr=0.25)
    opt.step()  # differ from the traced model, as after training; the optimizer has state
    moments = {n: opt.state[p]["exp_avg"].full_tensor().clone() for st in stages for n, p in st.submod.named_parameters()}
    full = {n: p.full_tensor().clone() for st in stages for n, p in st.submod.named_parameters()}
    checkpoint.save(stages, where, format="dcp", optimizer=opt)
    dist.barrier()
    merged = checkpoint.merge(where)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(merged, strict=True)
    merge_err = max(float((merged[n] - t).abs().max()) for n, t in full.items())
    with torch.no_grad():
        for st in stages:
            for p in st.submod.parameters():
                p.zero_()
    fresh_opt = torch.optim.AdamW(params, lr=0.5)
    checkpoint.load(stages, where, format="dcp", optimizer=fresh_opt)
    load_err = max(float((p.full_tensor() - full[n]).abs().max()) for st in stages for n, p in st.submod.named_parameters())
    optim_err = max(float((fresh_opt.state[p]["exp_avg"].full_tensor() - moments[n]).abs().max())
                    for st in stages for n, p in st.submod.named_parameters())
    lr_back = all(g["lr"] == 0.25 for g in fresh_opt.param_groups)
    return {"merge_err": merge_err, "load_err": load_err, "optim_err": optim_err, "lr_back": float(lr_back)}


def _adamw_steps(stages: list[Any], sched: Any, ref: nn.Module, dp: int, n: int) -> float:
    """Step 1's gradients are in place on both sides: AdamW step, then two more steps; max parameter difference."""
    opt = torch.optim.AdamW([p for st in stages for p in st.submod.parameters()], lr=0.05)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05)
    for step in range(3):
        if step:
            g = torch.Generator().manual_seed(step)
            X, Y = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
            opt.zero_grad()
            ref_opt.zero_grad()
            nn.MSELoss()(ref(X), Y).backward()
            x, y = X.chunk(2)[dp], Y.chunk(2)[dp]
            sched.step(*((x,) if sched.holds(0) else ()), target=y if sched.holds(n - 1) else None)
        opt.step()
        ref_opt.step()
    with torch.no_grad():
        return max(float((p.full_tensor() - ref.get_parameter(fqn)).abs().max())
                   for st in stages for fqn, p in st.submod.named_parameters())


class ChainBlock(nn.Module):
    """A linear, then an elementwise chain that reads a parameter (a pointwise-recompute region under FSDP2)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return self.scale * torch.tanh(h) * torch.sigmoid(h) + x


def _pointwise_under_fsdp(mesh: Any, name: str, m: int) -> dict[str, Any]:
    """``recompute="pointwise"`` stages, then ``fully_shard`` per block and per stage: grads equal the plain run."""
    from torch.distributed.fsdp import fully_shard

    from pippy.recompute import is_recomputing

    pp, dp = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    cls, v = SCHEDS[name]
    n = 2 * v
    torch.manual_seed(0)
    model = nn.Sequential(*[ChainBlock() for _ in range(2 * n)]).double()
    ref = copy.deepcopy(model)
    X, Y = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    x, y = X.chunk(2)[dp], Y.chunk(2)[dp]
    nn.MSELoss()(ref(X), Y).backward()
    pipe = pipeline(model, m, (x,), split_spec={str(2 * k + 1): SplitPoint.END for k in range(n - 1)})
    place = cls.placement(2, v)
    stages = [pipe.build_stage(s, "cpu", group=mesh["pp"].get_group(), recompute="pointwise")
              for s in range(n) if place[s] == pp]
    rewritten = all(is_recomputing(st) for st in stages)
    for st in stages:
        for block in st.submod.children():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(st.submod, mesh=mesh["dp"])
    sched = cls(stages if v > 1 else stages[0], m, loss_fn=nn.MSELoss())
    sched.step(*((x,) if sched.holds(0) else ()), target=y if sched.holds(n - 1) else None)
    err = max(float((p.grad.full_tensor() - ref.get_parameter(fqn).grad).abs().max())
              for st in stages for fqn, p in st.submod.named_parameters())
    return {"grad_err": err, "rewritten": rewritten}


class _Tied(nn.Module):
    """An embedding tied to the head across the first and last stages (GPT-2's layout)."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(blocks)])
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.emb(ids)))


def _tied_under_fsdp(mesh: Any, name: str) -> float:
    """Tied weights replicated on two stages, each stage sharded by FSDP2: the copies' shards add up (the largest
    grad error against the plain model on the global batch, after two accumulated steps)."""
    from torch.distributed.fsdp import fully_shard

    pp, dp = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    cls, v = SCHEDS[name]
    n = 2 * v
    torch.manual_seed(0)
    model = _Tied(2 * n).double()
    ref = copy.deepcopy(model)
    X = torch.randint(0, 16, (16, 5), generator=torch.Generator().manual_seed(3))
    Y = torch.randint(0, 16, (16, 5), generator=torch.Generator().manual_seed(4))

    def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.reshape(-1, 16), y.reshape(-1))

    for _ in range(2):
        ce(ref(X), Y).backward()
    x, y = X.chunk(2)[dp], Y.chunk(2)[dp]
    pipe = pipeline(model, 4, (x,), split_spec={f"blocks.{2 * k + 1}": SplitPoint.END for k in range(n - 1)})
    place = cls.placement(2, v)
    stages = [pipe.build_stage(s, "cpu", group=mesh["pp"].get_group()) for s in range(n) if place[s] == pp]
    for st in stages:
        fully_shard(st.submod, mesh=mesh["dp"])
    sched = cls(stages if v > 1 else stages[0], 4, loss_fn=ce)
    for _ in range(2):
        sched.step(*((x,) if sched.holds(0) else ()), target=y if sched.holds(n - 1) else None)
    return max(float((p.grad.full_tensor() - ref.get_parameter(fqn).grad).abs().max())
               for st in stages for fqn, p in st.submod.named_parameters())


def dp_pp_fsdp(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    """Each schedule, m = 2 and 4: grads (gathered) equal the plain model's on the global batch; reductions per step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    pp, dp = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    calls = _count_reductions()
    report: dict[str, Any] = {}
    runs = [(name, m, False) for name in SCHEDS for m in MS.get(name, (2, 4))]
    runs += [(name, m, True) for name in BLOCKWISE for m in MS.get(name, (2, 4))]
    for name, m, blockwise in runs:
        cls, v = SCHEDS[name]
        n = 2 * v
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2 * n - 1)],
                              nn.Linear(8, 2)).double()
        ref = copy.deepcopy(model)
        X, Y = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
        x, y = X.chunk(2)[dp], Y.chunk(2)[dp]  # each DP rank's share of the global batch
        nn.MSELoss()(ref(X), Y).backward()  # FSDP2 averages over DP ranks: the global-batch mean
        pipe = pipeline(model, m, (x,), split_spec={str(2 * k + 1): SplitPoint.END for k in range(n - 1)})
        place = cls.placement(2, v)
        stages = [pipe.build_stage(s, "cpu", group=mesh["pp"].get_group()) for s in range(n) if place[s] == pp]
        groups = 0
        for st in stages:
            if blockwise:  # each original block its own FSDP group, as torchtitan does, then the stage's root
                for block in st.submod.children():
                    fully_shard(block, mesh=mesh["dp"])
                    groups += 1
            fully_shard(st.submod, mesh=mesh["dp"])
        sched = cls(stages if v > 1 else stages[0], m, loss_fn=nn.MSELoss())
        calls[0] = 0
        sched.step(*((x,) if sched.holds(0) else ()), target=y if sched.holds(n - 1) else None)
        err = 0.0
        for st in stages:
            for fqn, p in st.submod.named_parameters():
                full = p.grad.full_tensor()
                err = max(err, float((full - ref.get_parameter(fqn).grad).abs().max()))
        key = f"{name}/{m}" + ("/blocks" if blockwise else "")
        report[key] = {"grad_err": err, "reductions": calls[0], "stages": len(stages), "groups": groups}
        if blockwise:  # two more steps: after three AdamW steps the parameters equal the plain run's
            report[key]["param_err"] = _adamw_steps(stages, sched, ref, dp, n)
        if name == "interleaved_1f1b" and m == 4:
            report["checkpoint" + ("/blocks" if blockwise else "")] = _checkpoint_round_trip(
                stages, ref, f"{ckpt}{'_blocks' if blockwise else ''}")
    try:  # one file per stage cannot hold the shards of several data-parallel ranks
        pippy.checkpoint.save(stages, f"{ckpt}_torch")
        report["torch_format"] = "no error"
    except ValueError as exc:
        report["torch_format"] = str(exc)
    for name in ("1f1b", "zbv"):
        report[f"pointwise/{name}"] = _pointwise_under_fsdp(mesh, name, 4)
        report[f"tied/{name}"] = _tied_under_fsdp(mesh, name)
    whole = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).double()
    fully_shard(whole, mesh=mesh["dp"])
    try:
        pipeline(whole, 2, (torch.randn(4, 8, dtype=torch.float64),))
        report["sharded_first"] = "no error"
    except pippy.PipeTraceError as exc:
        report["sharded_first"] = str(exc)
    dist.barrier()
    return report


def _autocast_under_fsdp(mesh: Any, name: str) -> float:
    """pipeline() and step() inside torch.autocast with FSDP2 stages: the largest relative grad error against the
    plain model under the same autocast (a cast cached across a stage's backward once made it 0.3)."""
    from torch.distributed.fsdp import fully_shard

    pp, dp = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    cls, v = SCHEDS[name]
    n = 2 * v
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(2 * n - 1)], nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(16, 16, generator=g), torch.randn(16, 4, generator=g)

    def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(out.float(), y)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mse(ref(X), Y)
    loss.backward()
    x, y = X.chunk(2)[dp], Y.chunk(2)[dp]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pipe = pipeline(model, 4, (x,), split_spec={str(2 * k + 1): SplitPoint.END for k in range(n - 1)})
    place = cls.placement(2, v)
    stages = [pipe.build_stage(s, "cpu", group=mesh["pp"].get_group()) for s in range(n) if place[s] == pp]
    for st in stages:
        fully_shard(st.submod, mesh=mesh["dp"])
    sched = cls(stages if v > 1 else stages[0], 4, loss_fn=mse)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sched.step(*((x,) if sched.holds(0) else ()), target=y if sched.holds(n - 1) else None)
    err = 0.0
    for st in stages:
        for fqn, p in st.submod.named_parameters():
            want = ref.get_parameter(fqn).grad
            err = max(err, float((p.grad.full_tensor() - want).abs().max() / want.abs().max().clamp_min(1e-12)))
    return err


def dp_pp_mixed(rank: int, world: int) -> dict[str, Any]:
    """FSDP2 MixedPrecisionPolicy (bf16 compute, fp32 reduce) on a Llama traced with compute_dtype=bf16, vs plain bf16."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    def loss_fn(out: Any, target: torch.Tensor) -> torch.Tensor:
        logits = out.logits if hasattr(out, "logits") else out
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    pp, dp = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    report: dict[str, Any] = {}
    for name, cls in (("gpipe", pippy.ScheduleGPipe), ("1f1b", pippy.Schedule1F1B)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2, use_cache=False))
        ref = copy.deepcopy(model).to(torch.bfloat16)  # the plain model computing in bf16, as the policy does
        X = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
        Y = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
        loss_fn(ref(X), Y).backward()
        x, y = X.chunk(2)[dp], Y.chunk(2)[dp]
        pipe = pipeline(model, 2, (x,), split_spec={"model.layers.1": SplitPoint.END}, compute_dtype=torch.bfloat16)
        stage = pipe.build_stage(pp, "cpu", group=mesh)
        for block in stage.submod.model.layers.children():
            fully_shard(block, mesh=mesh["dp"], mp_policy=mp)
        fully_shard(stage.submod, mesh=mesh["dp"], mp_policy=mp)
        losses: list[torch.Tensor] = []
        cls(stage, 2, loss_fn=loss_fn).step(*((x,) if pp == 0 else ()), target=y if pp == 1 else None, losses=losses)
        rel = 0.0
        for fqn, p in stage.submod.named_parameters():
            g, want = p.grad.full_tensor(), ref.get_parameter(fqn).grad.float()
            rel = max(rel, float((g - want).abs().max() / want.abs().max().clamp_min(1e-12)))
        report[name] = {
            "rel_err": rel, "param_dtype": str(next(stage.submod.parameters()).dtype),
            "grad_dtype": str(next(stage.submod.parameters()).grad.dtype),
            "edge_dtypes": sorted({str(m.dtype) for m in (stage.info.outputs if pp == 0 else stage.info.input_meta)}),
        }
    for name in ("1f1b", "zbv"):
        report[f"autocast/{name}"] = {"autocast_err": _autocast_under_fsdp(mesh, name)}
    dist.barrier()
    return report

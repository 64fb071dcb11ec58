"""Spawned-rank cases for pp 2 x tp 2: Llama blocks column/row parallel on the tp dimension (gloo, float64)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pippy
from pippy import SplitPoint, pipeline

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=32, use_cache=False)
SCHEDS = {"gpipe": pippy.ScheduleGPipe, "1f1b": pippy.Schedule1F1B}


def _loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _tp_plan() -> dict[str, Any]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def pp_tp(rank: int, world: int) -> dict[str, Any]:
    """Each schedule, m = 2 and 4: gathered grads after one step and parameters after 3 AdamW steps vs the plain model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from transformers import LlamaConfig, LlamaForCausalLM

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    pp = mesh["pp"].get_local_rank()
    report: dict[str, Any] = {}
    for name, cls in SCHEDS.items():
        for m in (2, 4):
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**LLAMA)).double()
            ref = copy.deepcopy(model)
            ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
            example = torch.zeros(8, 8, dtype=torch.long)
            pipe = pipeline(model, m, (example,), split_spec={"model.layers.1": SplitPoint.END})
            stage = pipe.build_stage(pp, "cpu", group=mesh)
            blocks = list(stage.submod.model.layers.children())
            for block in blocks:
                parallelize_module(block, mesh["tp"], _tp_plan())
            opt = torch.optim.AdamW(stage.parameters(), lr=1e-2)
            sched = cls(stage, m, loss_fn=_loss)
            grad_err = clip_err = 0.0
            for step in range(3):
                g = torch.Generator().manual_seed(10 + step)
                x, y = torch.randint(0, 64, (8, 8), generator=g), torch.randint(0, 64, (8, 8), generator=g)
                ref_opt.zero_grad()
                _loss(ref(x), y).backward()
                opt.zero_grad()
                sched.step(*((x,) if pp == 0 else ()), target=y if pp == 1 else None)
                if step == 0:
                    for fqn, p in stage.submod.named_parameters():
                        grad_err = max(grad_err, float((_full(p.grad) - ref.get_parameter(fqn).grad).abs().max()))
                norm = pippy.clip_grad_norm_(sched, 0.5)  # over both pipeline ranks and both TP shards
                want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
                clip_err = max(clip_err, abs(float(norm) - float(want)) / float(want))
                opt.step()
                ref_opt.step()
            with torch.no_grad():
                param_err = max(float((_full(p) - ref.get_parameter(fqn)).abs().max())
                                for fqn, p in stage.submod.named_parameters())
            sharded = sum(1 for p in stage.submod.parameters() if hasattr(p, "full_tensor"))
            report[f"{name}/{m}"] = {"grad_err": grad_err, "param_err": param_err, "sharded": sharded,
                                     "blocks": len(blocks), "clip_err": clip_err}
    report["gqa"] = _gqa_error(mesh, pp)
    dist.barrier()
    return report


def _gqa_error(mesh: Any, pp: int) -> str:
    """GQA: repeat_kv's traced expand fixes the key/value head count, so sharded heads cannot fit: a clear error."""
    from torch.distributed.tensor.parallel import parallelize_module
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA, "num_key_value_heads": 2})).double()
    pipe = pipeline(model, 2, (torch.zeros(8, 8, dtype=torch.long),), split_spec={"model.layers.1": SplitPoint.END})
    stage = pipe.build_stage(pp, "cpu", group=mesh)
    for block in stage.submod.model.layers.children():
        parallelize_module(block, mesh["tp"], _tp_plan())
    x = torch.randint(0, 64, (8, 8))
    try:
        pippy.Schedule1F1B(stage, 2, loss_fn=_loss).step(*((x,) if pp == 0 else ()), target=x if pp == 1 else None)
        return "no error"
    except Exception as exc:  # noqa: BLE001 - stage 0 raises the shape error, stage 1 learns that it stopped
        return "\n".join([str(exc), *getattr(exc, "__notes__", [])])

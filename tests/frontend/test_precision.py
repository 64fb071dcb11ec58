"""Mixed precision: pipes traced under torch.autocast or in a compute dtype; edges carry the dtype stages compute in."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from pippy import Schedule1F1B, ScheduleInterleaved1F1B, SplitPoint, StageError, pipeline
from pippy.runtime.local import LocalPipeline

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, use_cache=False)


def _loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), target.reshape(-1))


_loss.reduction = "mean"  # type: ignore[attr-defined]


@pytest.mark.parametrize("sched,cuts", [(Schedule1F1B, ["model.layers.1"]),
                                        (ScheduleInterleaved1F1B, ["model.layers.0", "model.layers.1", "model.layers.2"])])
def test_traced_and_run_under_autocast_matches_the_plain_model_under_autocast(sched: Any, cuts: list[str]) -> None:
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA))
    ref = copy.deepcopy(model)
    x, y = torch.randint(0, 64, (4, 8)), torch.randint(0, 64, (4, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pipe = pipeline(model, 2, (x,), split_spec={c: SplitPoint.END for c in cuts})
        lp = LocalPipeline(pipe, sched, num_ranks=2, n_microbatches=2, loss_fn=_loss)
        lp.step(x, target=y)
        plain = torch.stack([_loss(ref(x[:2]), y[:2]), _loss(ref(x[2:]), y[2:])]).mean()
    plain.backward()
    assert pipe.stage_infos[-1].outputs[0].dtype == torch.bfloat16  # logits as autocast computes them
    for st in lp.stages:
        for fqn, p in st.submod.named_parameters():
            want = ref.get_parameter(fqn).grad
            assert p.grad.dtype == torch.float32
            assert float((p.grad - want).abs().max()) <= 2e-2 * float(want.abs().max()), fqn  # bf16 tolerance
    with pytest.raises(StageError, match=r"traced under torch.autocast\('cpu', dtype=torch.bfloat16\) but this step "
                                         r"runs without torch.autocast"):
        lp.step(x, target=y)


def test_compute_dtype_traces_in_bf16_and_keeps_the_float32_masters() -> None:
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA))
    pipe = pipeline(model, 2, (torch.randint(0, 64, (4, 8)),), split_spec={"model.layers.1": SplitPoint.END},
                    compute_dtype=torch.bfloat16)
    assert [m.dtype for m in pipe.stage_infos[0].outputs] == [torch.bfloat16]  # activations travel in bf16
    for i in range(2):
        for fqn, p in pipe.get_stage_module(i).named_parameters():
            assert p is model.get_parameter(fqn) and p.dtype == torch.float32
    assert next(p for p in model.parameters()).dtype == torch.float32  # the model itself is untouched
    with pytest.raises(ValueError, match="compute_dtype must be a floating dtype"):
        pipeline(model, 2, (torch.randint(0, 64, (4, 8)),), compute_dtype=torch.int64)

"""Shapes and dtypes unlike a stage's raise PipeliningShapeError (a StageError and a ValueError), naming what differs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pippy import PipelineStage, PipeliningShapeError, ScheduleGPipe, ScheduleLoopedBFS, StageError, pipeline
from pippy.runtime.localcomm import LocalTransport


def _flatten(m: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
    return out.flatten()


def _bf16(m: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
    return out.bfloat16()


X = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
CASES = {  # PyTorch's test_shape_prop_mismatch, on two hand-cut stages that learned their shapes at a first step
    "batch+1": (torch.randn(9, 8), None, r"size 9 along dim 0, which does not split into 4 equal micro-batches"),
    "batch*2": (torch.randn(16, 8), None, r"shape mismatch at input leaf 0 \(args\[0\]\): a micro-batch has shape "
                                          r"\(4, 8\) torch.float32, but these hand-cut stages learned \(2, 8\)"),
    "int32": (X.to(torch.int32), None, r"dtype mismatch at input leaf 0 \(args\[0\]\): a micro-batch is torch.int32, "
                                       r"but these hand-cut stages learned torch.float32 .*Cast it to torch.float32 "
                                       r"\(x.float\(\)\)"),
    "flatten": (X, _flatten, r"stage 0, action 0F0 .*: shape mismatch: output 0 .* is torch.float32\[16\] but "
                             r"the stage's messages were built for float32\[2, 8\] \(fixed at its first step"),
    "bf16": (X, _bf16, r"stage 0, action 0F0 .*: dtype mismatch: output 0 .* is torch.bfloat16\[2, 8\]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hand_cut_stages_refuse_what_they_did_not_learn(world_of_one: None, case: str) -> None:
    x, hook, msg = CASES[case]
    torch.manual_seed(0)
    mods = [nn.Linear(8, 8) for _ in range(2)]
    sched = ScheduleLoopedBFS([PipelineStage(m, i, 2, "cpu") for i, m in enumerate(mods)], 4)
    torch.testing.assert_close(sched.step(X), mods[1](mods[0](X)), rtol=0, atol=1e-6)
    if hook is not None:
        mods[0].register_forward_hook(hook)
    with pytest.raises(PipeliningShapeError, match=msg) as info:
        sched.step(x)
    assert isinstance(info.value, StageError) and isinstance(info.value, ValueError)  # what was raised before


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.e(ids)


def test_a_dtype_alone_is_named_as_a_dtype_not_a_size(world_of_one: None) -> None:
    ids = torch.randint(0, 10, (4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stage = pipeline(Embed(), 2, (ids,)).build_stage(0, "cpu")
    sched = ScheduleGPipe(stage, 2, transport=LocalTransport.world(1)[0])
    with pytest.raises(PipeliningShapeError) as info:
        sched.eval(ids.int())
    msg = str(info.value)
    assert ("dtype mismatch at input leaf 0 (args[0]): a micro-batch is torch.int32 (shape (2, 3) as traced), but "
            "the pipeline was traced for torch.int64: cast it to torch.int64 (x.long())") in msg
    assert "size" not in msg and "shape mismatch" not in msg
    for given in (ids[:2], None):  # input_args given, or shapes learned at the first step
        sched = ScheduleGPipe(PipelineStage(Embed(), 0, 1, "cpu", input_args=given), 2)
        sched.step(ids)
        with pytest.raises(PipeliningShapeError, match=r"dtype mismatch at input leaf 0 \(args\[0\]\): a micro-batch "
                                                       r"is torch.int32, but .* torch.int64.*Cast it to torch.int64 "
                                                       r"\(x.long\(\)\)") as info:
            sched.step(ids.int())
        assert "size" not in str(info.value) and "micro-batch (batch / n_microbatches rows" not in str(info.value)


def test_a_shape_and_a_dtype_both_named_for_a_traced_pipe() -> None:
    ids = torch.randint(0, 10, (4, 3))
    stage = pipeline(Embed(), 2, (ids,)).build_stage(0, "cpu")
    sched = ScheduleGPipe(stage, 2, transport=LocalTransport.world(1)[0])
    with pytest.raises(PipeliningShapeError, match=r"shape mismatch and dtype mismatch at input leaf 0 .*Its dtype is "
                                                   r"torch.int32, traced as torch.int64.*Dim 1 is 5, traced as 3"):
        sched.eval(torch.randint(0, 10, (4, 5)).int())

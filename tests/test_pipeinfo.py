"""``pipe.info()`` and ``pippy.build_stage`` in both forms: pippy's (pipe first) and PyTorch pipelining's (module, index, info)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from models import MLPStack
from torch import fx

import pippy
from pippy import PipeInfo, ScheduleLoopedBFS, SplitPoint, build_stage, pipeline
from pippy.runtime.localcomm import LocalTransport

F64 = torch.float64
mse = torch.nn.functional.mse_loss


def _pipe() -> tuple[MLPStack, pippy.Pipe, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MLPStack(n=2, d=8).double()
    x, y = torch.randn(8, 8, dtype=F64), torch.randn(8, 4, dtype=F64)
    return model, pipeline(model, 2, (x,), split_spec={"blocks.0": SplitPoint.END}), x, y


def _train_step(stages: list[pippy.PipelineStage], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step of both stages on one rank; returns the output and every gradient by the model's FQN."""
    sched = ScheduleLoopedBFS(stages, 2, loss_fn=mse, transport=LocalTransport.world(1)[0])
    out = sched.step(x, target=y)
    grads = {n: p.grad for st in stages for n, p in st.submod.named_parameters()}
    return {"out": out, **grads}


def test_info_names_the_graph_the_stage_count_and_no_folded_loss() -> None:
    _, pipe, _, _ = _pipe()
    info = pipe.info()
    assert isinstance(info, PipeInfo) and isinstance(info.graph, fx.Graph)
    assert (info.num_stages, info.has_loss_and_backward) == (2, False)
    assert [n.target for n in info.graph.nodes if n.op == "call_module"] == ["submod_0", "submod_1"]
    assert "pipe=" not in repr(info)


def test_both_forms_build_the_same_stage_and_train_as_the_model() -> None:
    model, pipe, x, y = _pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_stage_module before build_stage: the stage still copies its weights
        peer = [build_stage(pipe.get_stage_module(i), i, pipe.info(), "cpu") for i in range(2)]
    ours = [build_stage(pipe, i, "cpu") for i in range(2)]
    assert [type(s) for s in peer] == [type(s) for s in ours] and [s.index for s in peer] == [0, 1]
    got, want = _train_step(peer, x, y), _train_step(ours, x, y)
    mse(model(x), y).backward()
    torch.testing.assert_close(got["out"], model(x), rtol=0, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_a_copy_with_other_weights_starts_the_stage_from_them() -> None:
    model, pipe, x, y = _pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = copy.deepcopy(pipe.get_stage_module(1))
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stage1 = build_stage(other, 1, pipe.info(), "cpu")
    assert stage1.submod is not other
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in dict(other.named_parameters()):  # blocks.1 and the head
            ref.get_parameter(name).mul_(-0.5)
    assert sorted({n.rsplit(".", 1)[0] for n, _ in other.named_parameters()}) == ["blocks.1.0", "blocks.1.2", "head"]
    got = _train_step([build_stage(pipe, 0, "cpu"), stage1], x, y)
    mse(ref(x), y).backward()
    torch.testing.assert_close(got["out"], ref(x), rtol=0, atol=1e-12)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=0, atol=1e-12)


def test_a_module_whose_parameters_do_not_match_the_stage_is_refused() -> None:
    _, pipe, _, _ = _pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrong_index = pipe.get_stage_module(0)
    with pytest.raises(ValueError, match=r"do not match stage 1 of the pipe: .*missing \['blocks\.1\..*unexpected "
                                         r"\['blocks\.0\..*Pass pipe\.get_stage_module\(1\)"):
        build_stage(wrong_index, 1, pipe.info(), "cpu")
    other = copy.deepcopy(wrong_index)
    other.get_submodule("blocks.0.0").weight = torch.nn.Parameter(torch.zeros(3, 8, dtype=F64))
    shape = r"other shapes \[.blocks\.0\.0\.weight: \(3, 8\) \(stage: \(16, 8\)\).\]"
    with warnings.catch_warnings(), pytest.raises(ValueError, match=shape):
        warnings.simplefilter("ignore")
        build_stage(other, 0, pipe.info(), "cpu")


def test_the_peer_form_needs_the_info_of_a_pippy_pipe() -> None:
    _, pipe, _, _ = _pipe()
    with pytest.raises(TypeError, match=r"expected pipe_info from pipe.info\(\) of a pippy pipe, got dict"):
        build_stage(torch.nn.Linear(2, 2), 0, {"num_stages": 2}, "cpu")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a pipe or a stage module first, got str"):
        build_stage("stage", 0, pipe.info(), "cpu")  # type: ignore[arg-type]
    with pytest.raises(IndexError, match="stage index 2 out of range"):
        build_stage(torch.nn.Linear(2, 2), 2, pipe.info(), "cpu")


def test_peer_names_at_the_top_level() -> None:
    from pippy import PipeliningShapeError, _ScheduleForwardOnly
    from pippy.PipelineSchedule import _ScheduleForwardOnly as same

    assert _ScheduleForwardOnly is same and pippy.build_stage is build_stage
    assert issubclass(PipeliningShapeError, pippy.StageError) and issubclass(PipeliningShapeError, ValueError)
    assert {"build_stage", "PipeInfo", "PipeliningShapeError", "_ScheduleForwardOnly"} <= set(pippy.__all__)


def test_the_peer_form_takes_the_modules_non_persistent_buffers() -> None:
    """A buffer kept out of the state_dict (RoPE's inv_freq) comes from the module given, as in PyTorch's package."""

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x) * self.scale)

    pipe = pipeline(Scaled(), 2, (torch.randn(4, 4),), split_spec={"a": SplitPoint.END})
    other = copy.deepcopy(pipe.get_stage_module(1))
    other.get_buffer("scale").fill_(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stage = build_stage(other, 1, pipe.info(), "cpu")
    h = torch.randn(2, 4)
    assert stage.submod.get_buffer("scale").tolist() == [3.0] * 4
    got, want = stage.submod(h), other(h)
    torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, want[0] if isinstance(want, tuple) else want)


def test_a_pipe_info_made_by_hand_is_refused_naming_pipe_info() -> None:
    _, pipe, _, _ = _pipe()
    info = PipeInfo(pipe.info().graph, 2, False)  # PyTorch's three fields
    with pytest.raises(TypeError, match=r"made by hand and holds no pipe.*Pass pipe.info\(\)"):
        build_stage(pipe.get_stage_module(0), 0, info, "cpu")

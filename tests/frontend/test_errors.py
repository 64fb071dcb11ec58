"""Bad input gets errors that say what was expected, what came, and how to fix it."""

from __future__ import annotations

import pytest
import torch
from models import MarkedMLP, MLPStack, check_mse_step, mse
from torch import nn

import pippy
from pippy import PipeTraceError, SplitPoint, StageError, pipe_split, pipeline
from pippy.runtime.local import LocalPipeline
from pippy.runtime.localcomm import LocalTransport


def test_split_point_naming_missing_module() -> None:
    with pytest.raises(PipeTraceError, match=r"'blocks\.9' names no submodule.*Did you mean"):
        pipeline(MLPStack(4).double(), 2, (torch.randn(4, 8, dtype=torch.float64),), split_spec={"blocks.9": SplitPoint.END})


def test_split_spec_leaves_model_untouched() -> None:
    model = MLPStack(2)
    pipeline(model, 2, (torch.randn(4, 8),), split_spec={"blocks.0": SplitPoint.END})
    assert "forward" not in model.blocks[0].__dict__


def test_batch_smaller_than_microbatches() -> None:
    with pytest.raises(ValueError, match=r"size 2 along dim 0, smaller than the 4 micro-batches"):
        pipeline(MarkedMLP(2, 1).double(), 4, (torch.randn(2, 8, dtype=torch.float64),))
    pipe = pipeline(MarkedMLP(2, 1).double(), 2, (torch.randn(4, 8, dtype=torch.float64),))
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=mse)
    with pytest.raises(ValueError, match=r"smaller than the 4 micro-batches"):
        lp.step(torch.randn(2, 8, dtype=torch.float64), target=torch.randn(2, 4, dtype=torch.float64))


def test_batch_not_divisible() -> None:
    with pytest.raises(ValueError, match=r"does not split into 3 equal micro-batches.*multiple of 3"):
        pipeline(MarkedMLP(2, 1), 3, (torch.randn(8, 8),))


def test_target_missing_with_loss_fn() -> None:
    pipe = pipeline(MarkedMLP(2, 1).double(), 2, (torch.randn(4, 8, dtype=torch.float64),))
    lp = LocalPipeline(pipe, pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2, loss_fn=mse)
    with pytest.raises(StageError, match=r"rank 1, stage 1 \(last\): loss_fn is set but target is None"):
        lp.step(torch.randn(4, 8, dtype=torch.float64))


def test_wrong_microbatch_shape_names_the_leaf() -> None:
    pipe = pipeline(MarkedMLP(2, 1).double(), 2, (torch.randn(4, 8, dtype=torch.float64),))
    lp = LocalPipeline(pipe, pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2, loss_fn=mse)
    with pytest.raises(ValueError, match=r"micro-batch has shape \(3, 8\).*traced for \(2, 8\)"):
        lp.step(torch.randn(6, 8, dtype=torch.float64), target=torch.randn(6, 4, dtype=torch.float64))


class DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


def test_untraceable_model_suggests_pipe_split() -> None:
    with pytest.raises(PipeTraceError, match=r"(?s)could not trace DataDependent.*data-dependent.*pipe_split"):
        pipeline(DataDependent(), 2, (torch.randn(4, 4),))


def test_no_loss_and_no_scalar_output() -> None:
    pipe = pipeline(MarkedMLP(2, 1).double(), 2, (torch.randn(4, 8, dtype=torch.float64),))
    lp = LocalPipeline(pipe, pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2)
    with pytest.raises(StageError, match=r"needs a scalar loss: pass loss_fn"):  # a step told to train
        lp._drive((torch.randn(4, 8, dtype=torch.float64),), {}, None, None, training=True)
    with pytest.warns(UserWarning, match=r"ran forward only"):  # step() without any loss: forward only
        assert lp.step(torch.randn(4, 8, dtype=torch.float64)).shape == (4, 4)


def test_wrong_stage_placement_for_multi_stage() -> None:
    pipe = pipeline(MarkedMLP(4, 1).double(), 2, (torch.randn(4, 8, dtype=torch.float64),))
    t = LocalTransport.world(2)
    stages = [pipe.build_stage(0, "cpu"), pipe.build_stage(1, "cpu")]
    with pytest.raises(StageError, match=r"rank 0 was given stages \[0, 1\] but the schedule places stages \[0, 2\]"):
        pippy.ScheduleInterleaved1F1B(stages, 4, mse, transport=t[0])
    with pytest.raises(StageError, match=r"world size is 2 but the pipe has 4 stages"):
        pippy.Schedule1F1B(stages[0], 4, mse, transport=t[0])


def test_unfreezing_where_gradients_flow_anyway_trains_exactly() -> None:
    """A weight frozen when traced, unfrozen later, in a stage whose outputs carry gradients anyway: exact."""
    torch.manual_seed(0)
    model = MarkedMLP(2, 1).double()
    model.blocks[0][0].weight.requires_grad_(False)
    pipe = pipeline(model, 2, (torch.randn(4, 8, dtype=torch.float64),))
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=mse)
    lp.stages[0].submod.get_parameter("blocks.0.0.weight").requires_grad_(True)  # unfrozen after tracing
    model.blocks[0][0].weight.requires_grad_(True)
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    check_mse_step(lp, model, x, y)


@pytest.mark.parametrize("cls", [pippy.ScheduleGPipe, pippy.Schedule1F1B, pippy.ScheduleZBH1])
def test_unfreezing_a_stage_traced_without_gradients_is_refused_at_its_forward(cls) -> None:
    """Stage 0 frozen when traced plans no gradient message; unfrozen after a step, its grads would be dropped."""
    torch.manual_seed(0)
    model = MarkedMLP(2, 1).double()
    model.blocks[0].requires_grad_(False)  # a frozen backbone
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    lp = LocalPipeline(pipeline(model, 2, (x,)), cls, num_ranks=2, n_microbatches=2, loss_fn=mse)
    lp.step(x, target=y)
    lp.stages[0].submod.requires_grad_(True)
    with pytest.raises(StageError, match=r"rank 0, stage 0, micro-batch 0, action 0F0: output 0 .* carries a gradient "
                                         r"to stage\(s\) \[1\].*blocks\.0\.0\.weight.*Call pipeline\(\) again"):
        lp.step(x, target=y)


def test_unfreezing_a_tied_weight_after_trace_is_refused() -> None:
    """Tied copies sum their gradients only when traced trainable: the schedule refuses at once."""
    lin = torch.nn.Linear(8, 8).double()

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.lin(x))
            pipe_split()
            return self.lin(h)

    lin.weight.requires_grad_(False)
    pipe = pipeline(Tied(), 2, (torch.randn(4, 8, dtype=torch.float64),))
    stage = pipe.build_stage(1, "cpu")
    stage.submod.get_parameter("lin.weight").requires_grad_(True)
    with pytest.raises(StageError, match=r"tied parameter lin\.weight was frozen .* call pipeline\(\) again"):
        pippy.Schedule1F1B(stage, 2, mse, transport=LocalTransport.world(2)[1])


class TupleAcross(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(self.lin(x), 4, dim=-1)  # a tuple; its unpacking lands after the split point
        pipe_split()
        return parts[0] * parts[1]


def test_tuple_is_unpacked_in_the_stage_that_makes_it() -> None:
    import copy

    torch.manual_seed(0)
    model = TupleAcross().double()
    ref = copy.deepcopy(model)
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    mse(ref(x), y).backward()
    pipe = pipeline(model, 2, (x,))
    assert all(m.is_tensor for m in pipe.stage_infos[0].outputs)
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=mse)
    lp.step(x, target=y)
    assert torch.allclose(lp.named_grads()["lin.weight"], ref.lin.weight.grad, atol=1e-12)


def test_an_unregistered_dataclass_output_names_the_registration() -> None:
    import dataclasses

    import torch.utils._pytree as pytree

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> Out:
            h = self.a(x)
            pipe_split()
            return Out(self.b(h))

    x = torch.randn(4, 4)
    with pytest.raises(PipeTraceError, match=r"output holds a <class '.*Out'>.*register_dataclass\(TheClass\)"):
        pipeline(Net(), 2, (x,))
    pytree.register_dataclass(Out)
    try:
        net = Net()
        assert torch.equal(pipeline(net, 2, (x,))(x)[0], net(x).logits)
    finally:
        pytree._deregister_pytree_node(Out)


@pytest.mark.parametrize("region", ["autocast", "no_grad"])
def test_pipe_split_inside_an_autocast_or_no_grad_block_is_refused(region: str) -> None:
    """The trace keeps such a block as one op: a split inside it would be lost silently (fewer stages)."""

    class Region(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if region == "autocast" else torch.no_grad()
            with ctx:
                h = self.a(x)
                pipe_split()
                h = self.b(h)
            return h.float()

    with pytest.raises(PipeTraceError, match=r"pipe_split\(\) inside a region the trace keeps as one op .*test_errors"
                                             r"\.py:\d+ .*end the `with` block before the split point"):
        pipeline(Region(), 2, (torch.randn(4, 4),))


def test_step_inputs_that_differ_from_the_trace_are_named_plainly() -> None:
    """Fewer positional inputs, another nesting, a tensor where None was traced, an unregistered class."""

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)

        def forward(self, x: torch.Tensor, pair: tuple, extra: torch.Tensor | None = None) -> torch.Tensor:
            h = self.a(x) + pair[0] * pair[1]
            pipe_split()
            return self.b(h if extra is None else h + extra)

    x, pair = torch.randn(4, 6), (torch.randn(4, 6), torch.randn(4, 6))
    lp = LocalPipeline(pipeline(Two(), 2, (x, pair), {"extra": None}), pippy.Schedule1F1B, num_ranks=2,
                       n_microbatches=2)
    with pytest.raises(ValueError, match=r"traced with 2 positional input\(s\) but got 1\. .*step\(x, \.\.\.\) there"):
        lp.eval(x, extra=None)
    with pytest.raises(ValueError, match=r"positional input 1 has another structure than when traced: expected "
                                         r"\(Tensor\[2, 6\], Tensor\[2, 6\]\), got \[Tensor\[2, 6\], Tensor\[2, 6\]\]"):
        lp.eval(x, list(pair), extra=None)
    with pytest.raises(ValueError, match=r"kwargs\['extra'\]\) is a tensor \[2, 6\] torch.float32 but the pipeline was "
                                         r"traced with None there"):
        lp.eval(x, pair, extra=torch.randn(4, 6))

    class Batch:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    class Takes(torch.nn.Module):
        def forward(self, b: Batch) -> torch.Tensor:
            return b.t * 2

    with pytest.raises(PipeTraceError, match=r"input holds a <class .*Batch'>.*register_dataclass.* or pass a tuple"):
        pipeline(Takes(), 1, (Batch(torch.ones(2, 2)),))


def test_a_split_point_on_a_module_called_through_forward_is_refused() -> None:
    """``self.b.forward(h)`` skips hooks, so the split point marking ``b`` would be lost silently."""

    class Direct(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b.forward(torch.tanh(self.a(x)))

    with pytest.raises(PipeTraceError, match=r"split points on \['b'\] never ran while tracing.*self\.sub\(\.\.\.\)"):
        pipeline(Direct(), 1, (torch.randn(2, 4),), split_spec={"b": SplitPoint.BEGINNING})


class _NeedsMask(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.bn = torch.nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.bn(self.lin(x)) * mask[:, None]  # type: ignore[index]


def test_inputs_the_model_cannot_run_on_are_told_apart_from_untraceable_code() -> None:
    model = _NeedsMask().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(PipeTraceError, match=r"fails on these inputs when run eagerly too.*inputs are the problem.*"
                                             r"leaves at None: mask;.*How to fix: pass what forward needs") as info:
        pipeline(model, 2, (torch.ones(4, 3),))
    assert "data-dependent" not in str(info.value)
    # the eager try-out left the model's running statistics and the random stream as they were
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng, torch.get_rng_state())


class _MaskOnlyWhileTraced(torch.nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return x * mask[:, None]  # type: ignore[index]
        return x


def test_a_none_read_only_under_the_trace_names_the_inputs_left_at_none() -> None:
    with pytest.raises(PipeTraceError, match=r"runs eagerly on these inputs, but not under the trace.*"
                                             r"leaves at None: mask;.*pass those inputs"):
        pipeline(_MaskOnlyWhileTraced(), 2, (torch.ones(4, 3),))


def test_a_split_spec_module_called_twice_is_named_at_pipeline_and_at_the_stage_count() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.tanh(self.a(torch.tanh(self.b(torch.tanh(self.a(x)))))))

    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"split point SplitPoint.END of 'a' .* was traced 2 times: forward calls the "
                                         r"module 2 times and each call is cut.*the pipe has 3 stages"):
        pipe = pipeline(Twice().double(), 2, (x,), split_spec={"a": SplitPoint.END})
    with pytest.raises(ValueError, match=r"places 2 stages, pipe has 3; .*forward calls the module 2 times"):
        LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=mse)

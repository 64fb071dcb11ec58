"""PiPPy's Pipe surface in its calling style: calling a pipe, split_gm, from_tracing, chunk-spec context managers, split policies."""

from __future__ import annotations

import copy

import pytest
import torch
from models import MLPStack
from torch import fx, nn

import pippy
from pippy import (
    ArgsChunkSpec,
    KwargsChunkSpec,
    Pipe,
    SplitPoint,
    annotate_split_points,
    pipe_split,
    pipeline,
    split_by_graph,
    split_into_equal_size,
    split_on_size_threshold,
)
from pippy.microbatch import TensorChunkSpec
from pippy.ModelSplit import aten_pipe_split_alias

TOL = 1e-12


def _mlp(n: int = 4) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return MLPStack(n).double(), torch.randn(8, 8, dtype=torch.float64)


def test_calling_a_pipe_runs_every_stage_and_keeps_autograd() -> None:
    model, x = _mlp()
    ref = copy.deepcopy(model)
    annotate_split_points(model, {"blocks.1": SplitPoint.END})
    pipe = pipeline(model, 2, example_args=(x,))
    out = pipe(x)  # PiPPy returned the flattened outputs
    assert isinstance(out, tuple) and len(out) == 1
    torch.testing.assert_close(out[0], ref(x), rtol=0, atol=TOL)
    out[0].sum().backward()
    ref(x).sum().backward()
    grads = dict(pipe.named_parameters())
    assert set(grads) == {f"submod_{i}.{n}" for i in range(2) for n, _ in pipe.get_stage_module(i).named_parameters()}
    for name, p in ref.named_parameters():
        stage = 0 if name.startswith(("blocks.0", "blocks.1")) else 1
        torch.testing.assert_close(grads[f"submod_{stage}.{name}"].grad, p.grad, rtol=0, atol=TOL)
    assert pipe.has_loss_and_backward is False


def test_pipe_call_binds_keywords_and_runs_batches_of_whole_micro_batches() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            h = self.a(x).view(2, 4)  # bakes in the traced micro-batch size (2 rows)
            pipe_split()
            return self.b(h + y)

    torch.manual_seed(0)
    m = Two().double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    pipe = pipeline(m, 4, (x,), {"y": y})
    ref = torch.cat([m(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)])
    for got in (pipe(x, y=y), pipe(x, y), pipe.forward(x=x, y=y)):
        torch.testing.assert_close(got[0], ref, rtol=0, atol=TOL)
    with pytest.raises(RuntimeError, match="traced for"):
        pipe(x[:3], y[:3])  # neither the traced size nor a whole number of micro-batches
    with pytest.raises(TypeError, match="the pipe takes the model's arguments"):
        pipe(x, y, x)


def test_split_gm_children_and_print_readable(capsys) -> None:
    model, x = _mlp()
    pipe = Pipe.from_tracing(model, 2, (x,), split_policy=split_into_equal_size(2))
    assert isinstance(pipe, Pipe) and pipe.num_stages == 2
    gm = pipe.split_gm
    assert isinstance(gm, fx.GraphModule)
    assert [n for n, _ in gm.named_children()] == ["submod_0", "submod_1"]
    torch.testing.assert_close(gm(x)[0], model(x), rtol=0, atol=TOL)
    pipe.print_readable()
    printed = capsys.readouterr().out
    assert "submod_0" in printed and "submod_1" in printed


def test_chunk_spec_context_managers() -> None:
    class ColSum(nn.Module):
        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return x * 2 + scale

    x = torch.randn(3, 8, dtype=torch.float64)
    with ArgsChunkSpec((1,)), KwargsChunkSpec({"scale": 1}):
        pipe = pipeline(ColSum(), 4, (x,), {"scale": torch.ones(3, 8, dtype=torch.float64)})
    assert pipe.args_chunk_spec == (TensorChunkSpec(1),) and pipe.kwargs_chunk_spec == {"scale": TensorChunkSpec(1)}
    assert pipe.example_leaves[0].shape == (3, 2)
    plain = pipeline(ColSum(), 3, (x,), {"scale": torch.ones(3, 8, dtype=torch.float64)})  # specs do not leak out
    assert plain.args_chunk_spec is None and plain.example_leaves[0].shape == (1, 8)
    with pytest.raises(ValueError, match=r"names \['scal'\] but the value has \['scale'\]"), ArgsChunkSpec((1,)), \
            KwargsChunkSpec({"scal": 1}):
        pipeline(ColSum(), 4, (x,), {"scale": torch.ones(3, 8, dtype=torch.float64)})


@pytest.mark.parametrize("policy", [split_into_equal_size(2), split_by_graph(2), split_on_size_threshold(175)],
                         ids=["equal_size", "by_graph", "size_threshold"])
def test_modelsplit_policies(policy) -> None:
    model, x = _mlp()
    pipe = pipeline(model, 2, (x,), split_policy=policy)
    assert pipe.num_stages >= 2
    torch.testing.assert_close(pipe(x)[0], model(x), rtol=0, atol=TOL)


def test_size_threshold_stage_count_follows_the_model() -> None:
    model, x = _mlp(4)
    block = sum(p.numel() for p in model.blocks[0].parameters())  # elements, as PiPPy counted
    few = pipeline(model, 1, (x,), split_policy=split_on_size_threshold(10 * block)).num_stages
    many = pipeline(model, 1, (x,), split_policy=split_on_size_threshold(block)).num_stages
    assert few == 1 and many >= 4
    with pytest.raises(ValueError, match="positive number of parameter elements"):
        split_on_size_threshold(0)


def test_pippy_style_graph_policy_inserting_the_split_op() -> None:
    """A policy ``fn(gm) -> gm`` that inserts ``aten_pipe_split_alias`` calls, as PiPPy's users wrote them."""
    model, x = _mlp()

    def after_every_add(gm: fx.GraphModule) -> fx.GraphModule:
        adds = [v for v in gm.graph.nodes if v.op == "call_function" and "add" in str(v.target)]
        for v in adds[:-1]:
            with gm.graph.inserting_after(v):
                gm.graph.call_function(aten_pipe_split_alias, (), {})
        gm.recompile()
        return gm

    pipe = pipeline(model, 2, (x,), split_policy=after_every_add)
    assert pipe.num_stages == 4
    torch.testing.assert_close(pipe(x)[0], model(x), rtol=0, atol=TOL)


def test_get_stage_module_is_the_live_stage_module() -> None:
    """After a stage is built, PiPPy's ``pipe.get_stage_module(i)`` is the module that stage runs and trains."""
    model, x = _mlp()
    pipe = pipeline(model, 2, (x,), split_spec={"blocks.1": SplitPoint.END})
    before = pipe.get_stage_module(1)
    stage = pipe.build_stage(1, "cpu")
    assert pipe.get_stage_module(1) is stage.submod and before is not stage.submod
    with torch.no_grad():
        stage.submod.head.weight.add_(1.0)
    assert torch.equal(pipe.get_stage_module(1).head.weight, stage.submod.head.weight)
    del stage
    import gc

    gc.collect()
    assert pipe.get_stage_module(1) is before  # the traced module again once the stage is gone


def test_remap_qualname_and_the_mapping_name_the_models_parameters() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
    pipe = pipeline(net, 2, (torch.randn(4, 4),), split_spec={"0": SplitPoint.END})
    mapping = pipe.new_to_old_qualname_mapping
    assert sorted(mapping.values()) == sorted(n for n, _ in net.named_parameters())
    for new, old in mapping.items():
        assert pipe.remap_qualname(new) == old == pipe.remap_qualname(f"split_gm.{new}")
        assert torch.equal(dict(pipe.named_parameters())[new], net.get_parameter(old))


class _SumLoss(nn.Module):
    def __init__(self, baked: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.baked = nn.Linear(8, 8), nn.Linear(8, 8), baked

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x)
        if self.baked:  # bakes the traced micro-batch size (4) into the graph
            h = h.reshape(4, -1)[:, :8]  # the whole batch at once gives 4 rows, not 16
        pipe_split()
        out = self.b(h)
        return out, nn.functional.mse_loss(out, y, reduction="sum")


@pytest.mark.parametrize("baked", [False, True])
def test_calling_the_pipe_on_the_full_batch_runs_it_at_once_when_the_graph_allows(baked: bool) -> None:
    torch.manual_seed(0)
    model = _SumLoss(baked).double()
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 4, (x, y))
    out, loss = pipe(x, y)
    if baked:  # the model itself only runs per micro-batch: so does the pipe, and the summed loss merges by summing
        parts = [model(xi, yi) for xi, yi in zip(x.chunk(4), y.chunk(4))]
        ref_out, ref_loss = torch.cat([p[0] for p in parts]), torch.stack([p[1] for p in parts]).sum()
    else:  # at once, as PiPPy ran it: the sum over the whole batch
        ref_out, ref_loss = model(x, y)
    assert torch.allclose(out, ref_out, atol=1e-12)
    assert torch.allclose(loss, ref_loss, atol=1e-9)


def test_a_stage_that_updates_running_statistics_runs_micro_batch_by_micro_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 2, (x,), split_spec={"1": SplitPoint.END})
    pipe(x)
    bn = pipe.get_stage_module(0).get_submodule("1")
    assert int(bn.num_batches_tracked) == 2  # once per micro-batch, no extra whole-batch attempt


class _Timestep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        h = self.a(x) * t
        pipe_split()
        return self.b(h)


def test_a_plain_value_traced_as_an_input_may_be_left_out_as_pippy_allowed() -> None:
    from pippy.runtime.local import LocalPipeline

    model = _Timestep()
    x = torch.randn(8, 4)
    pipe = pipeline(model, 2, (x, 3))  # PiPPy's unet example traces (noise, 1) and then calls step(noise)
    assert torch.allclose(pipe(x)[0], model(x, 3)) and torch.allclose(pipe(x, 3)[0], model(x, 3))
    lp = LocalPipeline(pipe, pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2)
    assert torch.allclose(lp.eval(x), model(x, 3))
    with pytest.raises(ValueError, match="is the constant 4 but the pipeline was traced with 3"):
        lp.eval(x, 4)
    with pytest.raises(TypeError, match="missing a required argument: 'x'"):
        pipe()  # a tensor is never filled in


class _BakedScalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        g = h.reshape(x.shape[0], -1, 4).softmax(1)  # the micro-batch's size is baked in when traced
        return self.b(g).pow(2).mean()


def test_a_scalar_alone_never_vouches_for_a_whole_batch_run() -> None:
    # nothing in a lone scalar output shows whether the graph ran the whole batch right: micro-batches, merged
    torch.manual_seed(0)
    model = _BakedScalar().double()
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    pipe = pipeline(model, 4, (x,), split_spec={"a": SplitPoint.END})
    want = torch.stack([model(c) for c in x.chunk(4)]).mean()
    assert torch.allclose(pipe(x)[0], want, atol=1e-12)
    assert torch.allclose(pipe(x)[0], want, atol=1e-12)  # the dropped attempt is remembered; same answer


def test_a_scalar_output_beside_a_dim_1_output_still_averages() -> None:
    from pippy.runtime.local import LocalPipeline

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh()).double()
    x = torch.randn(5, 8, 16, dtype=torch.float64)

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.m(x)
            return h, h.pow(2).mean()

    net = Both()
    pipe = pipeline(net, 4, (x,), args_chunk_spec=(TensorChunkSpec(1),), split_spec={"m.0": SplitPoint.END})
    assert pipe.output_merge_dims == [1, 0]
    lp = LocalPipeline(pipe, pippy.ScheduleGPipe, num_ranks=2, n_microbatches=4)
    h, s = lp.eval(x)
    ref_h, ref_s = net(x)
    assert h.shape == ref_h.shape and torch.allclose(h, ref_h, atol=1e-12) and torch.allclose(s, ref_s, atol=1e-12)


def test_torch_pipelining_call_form_traces_one_micro_batch() -> None:
    """``pipeline(module, mb_args=..., mb_kwargs=...)`` and ``pipeline(module, (x_mb,), mb_kwargs, split_spec)``, as
    in torch.distributed.pipelining: traced on one micro-batch, a schedule of 4 runs the full batch exactly."""
    from pippy import Schedule1F1B
    from pippy.runtime.local import LocalPipeline

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(x)) * mask)

    torch.manual_seed(0)
    model = Masked().double()
    x, mask, y = (torch.randn(8, 4, dtype=torch.float64), torch.rand(8, 4, dtype=torch.float64),
                  torch.randn(8, 2, dtype=torch.float64))
    spec = {"a": SplitPoint.END}
    by_kw = pipeline(copy.deepcopy(model), mb_args=(x[:2],), mb_kwargs={"mask": mask[:2]}, split_spec=spec)
    by_pos = pipeline(copy.deepcopy(model), (x[:2],), {"mask": mask[:2]}, spec)
    ref = copy.deepcopy(model)
    nn.functional.mse_loss(ref(x, mask), y).backward()
    for pipe in (by_kw, by_pos):
        assert pipe.num_chunks == 1 and pipe.num_stages == 2
        lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=nn.functional.mse_loss)
        out = lp.step(x, mask=mask, target=y)
        assert torch.allclose(out, ref(x, mask), atol=1e-12)
        for n, p in ref.named_parameters():
            assert torch.allclose(lp.named_grads()[n], p.grad, atol=1e-12), n
    assert pipeline(copy.deepcopy(model), mb_args=x[:2], mb_kwargs={"mask": mask[:2]}).num_chunks == 1  # a bare tensor
    with pytest.raises(TypeError, match="either them or num_chunks"):
        pipeline(model, 4, (x,), mb_args=(x[:2],))
    with pytest.raises(TypeError, match="mb_kwargs must be a dict"):
        pipeline(model, (x[:2],), (mask[:2],))
    with pytest.raises(TypeError, match="needs num_chunks"):
        pipeline(model)


class _PerRow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, n: int = 2, flag: bool = False) -> tuple[torch.Tensor, ...]:
        h = torch.tanh(self.a(x)) * n + (1.0 if flag else 0.0)
        o = self.b(h)
        return o, ((o - t) ** 2).sum() / x.shape[0]


def test_calling_the_pipe_with_a_loss_divided_by_the_batch_size_equals_the_model() -> None:
    """The trace bakes ``x.shape[0]`` in as one micro-batch's size: the pipe runs micro-batch by micro-batch (not
    the whole batch at once, which would divide by that size), so loss and grads equal the model's."""
    torch.manual_seed(0)
    model = _PerRow().double()
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    pipe = pipeline(model, 4, (x, y), split_spec={"a": SplitPoint.END})
    for batch in (8, 6):
        out, loss = pipe(x[:batch], y[:batch])
        want_out, want = ref(x[:batch], y[:batch])
        assert torch.allclose(out, want_out, atol=1e-12) and torch.allclose(loss, want, atol=1e-12), batch
    loss.backward()
    want.backward()
    assert torch.allclose(pipe.get_stage_module(0).get_parameter("a.bias").grad, ref.a.bias.grad, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_a_batch_that_is_no_whole_number_of_micro_batches_is_refused_where_the_count_is_baked(batch: int) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    pipe = pipeline(_PerRow().double(), 4, (x, y), split_spec={"a": SplitPoint.END})
    with pytest.raises(ValueError, match=rf"shape \[{batch}, 4\].*traced micro-batch's \[2, 4\].*x.shape\[0\]"):
        pipe(x[:batch], y[:batch])


def test_calling_the_pipe_with_an_argument_the_trace_did_not_see_is_refused() -> None:
    torch.manual_seed(0)
    model = _PerRow().double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 4, (x, y), split_spec={"a": SplitPoint.END})
    assert torch.allclose(pipe(x, y, flag=False)[0], model(x, y)[0], atol=1e-12)  # the default: fine
    with pytest.raises(TypeError, match=r"traced without the argument 'n'.*keeps n=2.*example_kwargs"):
        pipe(x, y, n=3)
    with pytest.raises(TypeError, match=r"traced without the argument 'flag'"):
        pipe(x, y, flag=True)
    traced_n = pipeline(copy.deepcopy(model), 4, (x, y, 2), split_spec={"a": SplitPoint.END})
    with pytest.raises(ValueError, match=r"input leaf 2 is the constant 3 but the pipe was traced with 2"):
        traced_n(x, y, 3)


def test_torch_pipelining_schedule_and_stage_arguments_are_taken_or_refused_with_the_fix() -> None:
    from pippy import Schedule1F1B, TensorChunkSpec
    from pippy.PipelineStage import PipelineStage
    from pippy.runtime.local import LocalPipeline

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 4, (x,), split_spec={"1": SplitPoint.END})
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=nn.functional.mse_loss,
                       scale_grads=False, args_chunk_spec=None)
    assert lp.schedules[0].loss_reduction == "sum"  # torch's scale_grads=False: grads of the micro-batches' sum
    lp.step(x, target=y)
    ref = copy.deepcopy(model)
    sum(nn.functional.mse_loss(ref(a), b) for a, b in zip(x.chunk(4), y.chunk(4))).backward()
    for n, p in ref.named_parameters():
        assert torch.allclose(lp.named_grads()[n], p.grad, atol=1e-12), n
    with pytest.raises(TypeError, match=r"args_chunk_spec=.* differs from the one the pipe was traced with.*pipeline"):
        LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=nn.functional.mse_loss,
                      args_chunk_spec=(TensorChunkSpec(1),))
    hand_cut = PipelineStage(model[0], 0, 2, torch.device("cpu"), input_args=(x[:2],))  # torch's module form
    assert isinstance(hand_cut, PipelineStage) and hand_cut.describe_edges() == \
        "stage 0: in [float64[2, 4]] -> out [float64[2, 4]]"
    with pytest.raises(TypeError, match=r"dw_builder is not supported"):
        PipelineStage(model[0], 0, 2, "cpu", input_args=(x[:2],), dw_builder=lambda: None)
    with pytest.raises(TypeError, match=r"takes no other arguments; got 0 more positional and \['input_args'\]"):
        PipelineStage(pipe, 0, "cpu", None, input_args=(x[:2],))


def test_torch_pipelining_forms_of_pipeline_split_points_and_schedule_options() -> None:
    """Every call form of torch's ``pipeline(module, mb_args, mb_kwargs, split_spec, split_policy)``, torch's own
    ``pipe_split()`` / ``SplitPoint`` in model code, ``step(loss_kwargs=)``, ``eval(target=, losses=)`` and an explicit
    dim-0 chunk spec on the schedule work as there."""
    import torch.distributed.pipelining as tdp

    from pippy import Schedule1F1B, TensorChunkSpec
    from pippy.ModelSplit import split_into_equal_size as equal
    from pippy.runtime.local import LocalPipeline

    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            h = torch.tanh(self.a(x))
            return self.b(h if y is None else h + y)

    class PeerMarked(Kw):
        def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            h = torch.tanh(self.a(x))
            tdp.pipe_split()
            return self.b(h if y is None else h + y)

    torch.manual_seed(0)
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    spec, peer_spec = {"a": SplitPoint.END}, {"a": tdp.SplitPoint.END}
    forms = {
        "(x,), split_spec=": lambda m: pipeline(m, (x,), split_spec=spec),
        "(x,), {y}, spec": lambda m: pipeline(m, (x,), {"y": y}, spec),
        "(x,), mb_kwargs=, split_spec=": lambda m: pipeline(m, (x,), mb_kwargs={"y": y}, split_spec=spec),
        "(x,), None, spec": lambda m: pipeline(m, (x,), None, spec),
        "(x,), None, None, policy": lambda m: pipeline(m, (x,), None, None, equal(2)),
        "(x,), split_policy=": lambda m: pipeline(m, (x,), split_policy=equal(2)),
        "torch SplitPoint": lambda m: pipeline(m, (x,), split_spec=peer_spec),
        "torch pipe_split()": lambda m: pipeline(PeerMarked(), (x,)),
    }
    for name, make in forms.items():
        assert make(Kw()).num_stages == 2, name
    with pytest.raises(TypeError, match="at most one split_spec mapping and one split_policy"):
        pipeline(Kw(), (x,), None, spec, split_spec=spec)

    model = Kw().double()
    xb, yb = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)

    def scaled(out: torch.Tensor, target: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return nn.functional.mse_loss(out, target) * scale

    pipe = pipeline(copy.deepcopy(model), 4, (xb,), split_spec=spec)
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=scaled,
                       args_chunk_spec=(TensorChunkSpec(0),), loss_reduction="mean")  # the default spec, spelled out
    losses: list[torch.Tensor] = []
    lp.step(xb, target=yb, losses=losses, loss_kwargs={"scale": 3.0})
    ref = copy.deepcopy(model)
    scaled(ref(xb), yb, 3.0).backward()
    want = [float(scaled(ref(a), b, 3.0)) for a, b in zip(xb.chunk(4), yb.chunk(4))]
    assert [float(v) for v in losses] == pytest.approx(want, abs=1e-12)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(lp.named_grads()[n], p.grad, rtol=0, atol=1e-12, msg=n)
    sched = lp.schedules[-1]
    assert sched.holds(1) and not sched.holds(0)
    ev: list[torch.Tensor] = []
    out = lp.eval(xb, target=yb, losses=ev, loss_kwargs={"scale": 3.0})  # torch's eval(target=, losses=)
    torch.testing.assert_close(out, ref(xb).detach(), rtol=0, atol=1e-12)
    assert [float(v) for v in ev] == pytest.approx(want, abs=1e-12) and not any(v.requires_grad for v in ev)


def test_annotated_models_deep_copy_and_pickle_as_plain_ones(tmp_path) -> None:
    """annotate_split_points adds hooks: a deep copy runs its own weights and keeps the split points, torch.save
    works, and split_spec leaves no hook behind."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    annotate_split_points(net, {"0": SplitPoint.END, "2": SplitPoint.BEGINNING})
    annotate_split_points(net, {"0": SplitPoint.END})  # marking twice is once
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin[0].weight.zero_()
    x = torch.randn(2, 4)
    assert torch.equal(twin(x), nn.Sequential(*copy.deepcopy(list(twin)))(x))  # the copy's own weights
    pipe = pipeline(twin, 1, (x,))
    assert pipe.num_stages == 3 and pipe.split_sites == [
        "SplitPoint.END of '0' (split_spec / annotate_split_points)",
        "SplitPoint.BEGINNING of '2' (split_spec / annotate_split_points)"]
    torch.save(net, tmp_path / "net.pt")
    assert pipeline(torch.load(tmp_path / "net.pt", weights_only=False), 1, (x,)).num_stages == 3
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert pipeline(plain, 1, (x,), split_spec={"0": SplitPoint.END}).num_stages == 2
    assert not plain[0]._forward_hooks and pipeline(plain, 1, (x,)).num_stages == 1


def test_schedule_arguments_past_loss_fn_must_be_keywords() -> None:
    """PiPPy's 4th positional argument was output_merge_spec, PyTorch's is args_chunk_spec: the error names both."""
    from pippy import ScheduleGPipe
    from pippy.runtime.localcomm import LocalTransport

    pipe = pipeline(nn.Linear(4, 4), 2, (torch.randn(4, 4),))
    with pytest.raises(TypeError, match=r"ScheduleGPipe\(\) takes the stage\(s\), n_microbatches and loss_fn "
                                        r"positionally, got 1 more.*output_merge_spec=.*args_chunk_spec="):
        ScheduleGPipe(pipe.build_stage(0, "cpu"), 2, nn.functional.mse_loss, None,
                      transport=LocalTransport.world(1)[0])


def test_counted_cross_entropy_with_loss_kwargs_and_in_eval_and_torch_chunk_specs() -> None:
    """``F.cross_entropy`` with padding stays exact with ``loss_kwargs``; ``eval(target=)`` reports each micro-batch's
    own mean; torch's own ``TensorChunkSpec(0)`` on a schedule is the default."""
    import functools

    from torch.distributed.pipelining.microbatch import TensorChunkSpec as TorchSpec

    from pippy import Schedule1F1B
    from pippy.runtime.local import LocalPipeline

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.tensor([0, 1, -100, 3, -100, -100, 2, 4])
    loss = functools.partial(nn.functional.cross_entropy, ignore_index=-100)
    pipe = pipeline(copy.deepcopy(model), 4, (x,), split_spec={"1": SplitPoint.END})
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=loss,
                       args_chunk_spec=(TorchSpec(0),))
    lp.step(x, target=y, loss_kwargs={"label_smoothing": 0.0})
    ref = copy.deepcopy(model)
    loss(ref(x), y).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(lp.named_grads()[n], p.grad, rtol=0, atol=1e-12, msg=n)
    got: list[torch.Tensor] = []
    lp.eval(x, target=y, losses=got)
    want = [float(loss(ref(a), b)) for a, b in zip(x.chunk(4), y.chunk(4))]
    assert [float(v) for v in got] == pytest.approx(want, abs=1e-12, nan_ok=True)


def test_a_stage_module_taken_before_its_stage_is_built_is_named() -> None:
    """torchtitan-style code collects pipe.get_stage_module(i) before build_stage(i): that module does not train."""
    import warnings

    x = torch.randn(8, 4)
    pipe = pipeline(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), 4, (x,), split_spec={"1": SplitPoint.END})
    early = pipe.get_stage_module(0)
    with pytest.warns(UserWarning, match=r"get_stage_module\(0\) was called before stage 0 was built"):
        stage = pipe.build_stage(0, "cpu")
    assert pipe.get_stage_module(0) is stage.submod is not early
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.build_stage(1, "cpu")
        pipe.build_stage(0, "cpu")  # said once


def test_pipe_to_moves_the_stage_modules_and_stages_build_after_it() -> None:
    """PyTorch pipelining's ``pipeline(...).to(device)`` (its Pipe is a module): device moves, dtypes refused."""
    torch.manual_seed(0)
    model = MLPStack(n=2, d=8).double()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 8, dtype=torch.float64)
    pipe = pipeline(model, 2, (x,), split_spec={"blocks.0": SplitPoint.END})
    assert pipe.to("cpu") is pipe and pipe.to(torch.device("cpu"), non_blocking=True) is pipe
    torch.testing.assert_close(pipe(x)[0], model(x), rtol=0, atol=TOL)
    stage = pipe.build_stage(1, "cpu")
    assert pipe.to("meta") is pipe  # a real move of the traced stage modules; the built stage 1 keeps its copy
    assert pipe.split_gm.get_submodule("submod_0").get_parameter("blocks.0.0.weight").is_meta
    assert pipe.stage_infos[1].module.get_parameter("head.weight").is_meta
    assert stage.submod.get_parameter("head.weight").device == torch.device("cpu")
    rebuilt = pipe.build_stage(0, "cpu", checkpoint=state)  # a stage built afterwards, on another device
    assert rebuilt.device == torch.device("cpu")
    torch.testing.assert_close(rebuilt.state_dict()["blocks.0.0.weight"], state["blocks.0.0.weight"], rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"Pipe.to\(torch.float32\): expected a device only, got the dtype "
                                        r"torch.float32.*cast the model \(model.to\(dtype\)\) before pipeline\(\)"):
        pipe.to(torch.float32)
    with pytest.raises(TypeError, match=r"got the dtype torch\.float16"):
        pipe.to("cpu", dtype=torch.float16)

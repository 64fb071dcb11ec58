"""A stage built on another device than the trace's runs its graphs' device constants on its own device."""

from __future__ import annotations

import torch
from torch import fx, nn

from pippy import SplitPoint, pipeline
from pippy.frontend.retarget import retarget_devices
from pippy.runtime.stage import Stage


class Block(nn.Module):
    """Makes a tensor on its input's device, as Hugging Face's position ids do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)
        return self.lin(x) + pos[None, :, None] + torch.zeros(1, device=x.device)


def _devices(module: nn.Module) -> set[str]:
    graphs = [m.graph for m in module.modules() if isinstance(getattr(m, "graph", None), fx.Graph)]
    return {str(v) for g in graphs for n in g.nodes for v in [*n.args, *n.kwargs.values()]
            if isinstance(v, torch.device)}


def test_a_stage_built_on_another_device_runs_the_traced_device_constants_there() -> None:
    # "meta" stands in for cuda:N (a stage built on another device than the CPU the model was traced on)
    pipe = pipeline(nn.Sequential(Block(), Block()), 2, (torch.randn(4, 3, 8),), split_spec={"0": SplitPoint.END})
    assert pipe.traced_device == torch.device("cpu")
    for i in range(2):
        st = Stage(pipe, i, "meta")
        flat = st.flat_module()
        assert _devices(st.submod) == _devices(flat) == {"meta"}  # the outlined tree's graphs and the flat one
        inp = torch.randn(2, 3, 8, device="meta")
        for fn in (st.submod, flat):  # F/B run the outlined tree, split backward taps the flat graph
            out = fn(inp)
            assert (out[0] if isinstance(out, tuple) else out).device.type == "meta"
    assert _devices(pipe.stage_infos[0].module) == {"cpu"}  # the pipe's own graphs keep the trace device


def test_a_stage_on_the_trace_device_keeps_its_graphs() -> None:
    pipe = pipeline(nn.Sequential(Block(), Block()), 2, (torch.randn(4, 3, 8),), split_spec={"0": SplitPoint.END})
    st = Stage(pipe, 1, "cpu")
    assert _devices(st.flat_module()) == {"cpu"}
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(st.submod(x)[0], pipe.stage_infos[1].module(x)[0])


def test_only_the_traced_device_is_retargeted_not_a_deliberate_op_elsewhere() -> None:
    # a model on cuda:0 that computes something on the CPU on purpose, built on cuda:1 (no CUDA needed: only args)
    g = fx.Graph()
    x = g.placeholder("x")
    on_gpu = g.call_function(torch.ones, (2,), {"device": torch.device("cuda", 0)})
    on_cpu = g.call_function(torch.ones, (2,), {"device": torch.device("cpu")})
    by_name = g.call_function(torch.zeros, (2,), {"device": "cuda"})
    g.output((x, on_gpu, on_cpu, by_name))
    gm = fx.GraphModule(nn.Module(), g)
    assert retarget_devices(gm, [torch.device("cuda", 0)], torch.device("cuda", 1))
    got = [n.kwargs["device"] for n in gm.graph.nodes if n.op == "call_function"]
    assert got == [torch.device("cuda", 1), torch.device("cpu"), torch.device("cuda", 1)]
    assert not retarget_devices(gm, [torch.device("cuda", 1)], "cuda:1")  # nothing to do


def test_a_meta_model_records_meta_as_its_trace_device() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    pipe = pipeline(net, 1, (torch.ones(1, 2),), split_spec={"0": SplitPoint.END})
    assert pipe.traced_device == torch.device("meta")
    st = Stage(pipe, 0, "cpu")
    assert "meta" not in _devices(st.submod) | _devices(st.flat_module())

"""graphsplit never makes a backward edge and keeps its balance bound; every policy's pipe is transparent."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from models import MLPStack, gpt2, lm_loss, mse
from torch import nn

import pippy.frontend.costsplit as costsplit
from pippy import Schedule1F1B, ScheduleGPipe, pipeline
from pippy.frontend.costs import COMPUTE_OPS, graph_costs
from pippy.frontend.costsplit import autosplit, graphsplit
from pippy.frontend.graphsplit import MilpResult
from pippy.frontend.partition import best_contiguous
from pippy.frontend.policies import split_equal_layers, split_equal_params
from pippy.runtime.local import LocalPipeline

TOL = 1e-10


class Branchy(nn.Module):
    """Two branches from the input, a skip connection and a late constant: room for a non-contiguous split."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.a = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.b = nn.Linear(d, 4 * d)
        self.c = nn.Linear(4 * d, d)
        self.out = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for lin in self.a:
            h = torch.tanh(lin(h))
        side = torch.relu(self.b(x))  # wide value: best computed next to its consumer
        h = h + self.c(side)
        scale = torch.arange(h.shape[-1], dtype=h.dtype) / h.shape[-1]
        return self.out(h * scale + x)


def _check_forward_edges(assignment: dict[Any, int]) -> None:
    for node, s in assignment.items():
        for src in node.all_input_nodes:
            if src in assignment:
                assert assignment[src] <= s, f"backward edge {src.name}({assignment[src]}) -> {node.name}({s})"


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("balance", [0.0, 0.1])
def test_graphsplit_forward_edges_and_balance(n: int, balance: float) -> None:
    torch.manual_seed(0)
    model = Branchy().double()
    x = torch.randn(8, 16, dtype=torch.float64)
    seen: dict[str, Any] = {}

    def spy(gm: Any, inputs: Any) -> Any:
        policy = graphsplit(n, balance=balance, cost="flops")
        out = policy(gm, inputs)
        seen.update(policy=policy, assignment=out, gc=graph_costs(gm, inputs, "flops"))
        return out

    pipe = pipeline(model, 1, example_args=(x,), split_policy=spy)
    assert pipe.num_stages == n
    _check_forward_edges(seen["assignment"])
    _, auto_costs = best_contiguous(seen["gc"], n)
    assert max(seen["policy"].stage_costs) <= (1 + balance) * max(auto_costs) * (1 + 1e-9)
    assert sorted(set(seen["assignment"].values())) == list(range(n))


def test_graphsplit_gpt2_cuts_no_more_than_autosplit() -> None:
    model = gpt2(n_layer=4)
    x = torch.randint(0, 96, (4, 16))
    g, a = graphsplit(2, cost="flops"), autosplit(2, cost="flops", tolerance=0.02)
    pg = pipeline(model, 2, example_args=(x,), split_policy=g)
    pa = pipeline(model, 2, example_args=(x,), split_policy=a)
    sent = [sum(m.nbytes for m in p.stage_infos[0].outputs) for p in (pg, pa)]
    assert sent[0] <= sent[1] * 1.5  # boundary-crossing bytes: relay measure vs direct sends


def test_graphsplit_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_solution(*_a: Any, **_k: Any) -> MilpResult:
        return MilpResult(None, 1, "Time limit reached. (HiGHS Status 13)", 10)

    monkeypatch.setattr(costsplit, "solve_graphsplit", no_solution)
    model = MLPStack(n=4).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    g = graphsplit(2, cost="flops", time_limit=0.01)
    with pytest.warns(UserWarning, match="no usable solution.*using autosplit's split"):
        pipeline(model, 1, example_args=(x,), split_policy=g)
    a = autosplit(2, cost="flops")
    pipeline(model, 1, example_args=(x,), split_policy=a)
    assert g.last_assignment == a.last_assignment


def _transparent(model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: Any, policy: Any, sched: Any) -> None:
    ref = copy.deepcopy(model)
    out_ref = ref(x)
    loss_ref = loss_fn(out_ref, target)
    loss_ref.backward()
    pipe = pipeline(model, 4, example_args=(x,), split_policy=policy)
    assert pipe.num_stages == 2
    lp = LocalPipeline(pipe, sched, num_ranks=2, n_microbatches=4, loss_fn=loss_fn)
    losses: list[torch.Tensor] = []
    out = lp.step(x, target=target, losses=losses)
    got = out.logits if hasattr(out, "logits") else out
    want = out_ref.logits if hasattr(out_ref, "logits") else out_ref
    assert float((got - want).abs().max()) < TOL
    assert abs(float(torch.stack(losses).mean() - loss_ref)) < TOL
    grads = lp.named_grads()
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    assert grads
    for name, g in grads.items():
        assert g is not None, name
        assert float((g - ref_params[name].grad).abs().max()) < TOL, name


POLICIES = {
    "auto_flops": lambda: autosplit(2, cost="flops"),
    "auto_time": lambda: autosplit(2, cost="time", repeats=2),
    "graph": lambda: graphsplit(2, cost="flops"),
    "graph_time": lambda: graphsplit(2, cost="time", repeats=2),
    "params": lambda: split_equal_params(2),
    "layers": lambda: split_equal_layers(2),
}


@pytest.mark.parametrize("sched", [Schedule1F1B, ScheduleGPipe])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_transparency_mlp(name: str, sched: Any) -> None:
    torch.manual_seed(0)
    model = MLPStack(n=4).double()
    x = torch.randn(8, 8, dtype=torch.float64)
    _transparent(model, x, torch.randn(8, 4, dtype=torch.float64), mse, POLICIES[name](), sched)


@pytest.mark.parametrize(("name", "sched"), [("auto_time", Schedule1F1B), ("graph", ScheduleGPipe), ("layers", Schedule1F1B)])
def test_transparency_gpt2(name: str, sched: Any) -> None:
    torch.manual_seed(0)
    model = gpt2(n_layer=2)
    x = torch.randint(0, 96, (8, 16))
    _transparent(model, x, torch.randint(0, 96, (8, 16)), lm_loss, POLICIES[name](), sched)


def test_transparency_branchy_graphsplit() -> None:
    torch.manual_seed(0)
    model = Branchy().double()
    x = torch.randn(8, 16, dtype=torch.float64)
    policy = graphsplit(2, cost="flops", balance=0.1)
    _transparent(model, x, torch.randn(8, 3, dtype=torch.float64), mse, policy, Schedule1F1B)
    assert [v for v in policy.last_assignment if v.startswith("arange")]


def test_every_compute_node_assigned() -> None:
    model = MLPStack(n=2).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    captured: dict[str, Any] = {}

    def spy(gm: Any, inputs: Any) -> Any:
        out = graphsplit(2, cost="flops")(gm, inputs)
        captured["n"] = sum(1 for v in gm.graph.nodes if v.op in COMPUTE_OPS)
        captured["m"] = len(out)
        return out

    pipeline(model, 1, example_args=(x,), split_policy=spy)
    assert captured["n"] == captured["m"]

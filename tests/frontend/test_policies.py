"""Split policies: autosplit is exactly optimal (vs brute force), baselines cut where expected, bad arguments fail clearly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from models import MLPStack, MyNetwork, gpt2
from torch import fx, nn

from pippy import SplitPoint, pipeline
from pippy.frontend.costs import COMPUTE_OPS, GraphCosts, graph_costs
from pippy.frontend.costsplit import autosplit, graphsplit
from pippy.frontend.params import retarget_aliases
from pippy.frontend.partition import best_contiguous, cut_positions, min_memory_limit
from pippy.frontend.policies import split_by_names, split_equal_layers, split_equal_params
from pippy.frontend.trace import export_module

WIDTHS = [8, 96, 4, 160, 12, 64, 24, 200, 6]


def chain() -> nn.Sequential:
    """Linear layers of very different widths: the optimal bottleneck is nowhere near total/n."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(WIDTHS):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers).double()


def traced(model: nn.Module, *args: torch.Tensor) -> fx.GraphModule:
    gm = export_module(model, args).module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            gm.graph.erase_node(node)
    gm.recompile()
    retarget_aliases(gm)
    return gm


def brute_force(gc: GraphCosts, n: int, mem_limit: float | None = None) -> float:
    """Smallest bottleneck over every contiguous split at legal positions (memory model of partition.py)."""
    pos = list(cut_positions(gc))
    c = np.concatenate([[0.0], np.cumsum(gc.cost)])
    p = np.concatenate([[0.0], np.cumsum(gc.param_bytes)])
    best = float("inf")
    for inner in itertools.combinations(pos[1:-1], n - 1):
        b = [0, *inner, len(gc.nodes)]
        stages = list(itertools.pairwise(b))
        if mem_limit is not None:
            x = [0.0 if k in (0, len(gc.nodes)) else gc.live_bytes[k] for k in b]
            mems = [p[e] - p[s] + x[i] + x[i + 1] for i, (s, e) in enumerate(stages)]
            if max(mems) > mem_limit:
                continue
        best = min(best, max(c[e] - c[s] for s, e in stages))
    return best


@pytest.mark.parametrize("kind", ["flops", "params"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_autosplit_matches_brute_force_on_chain(kind: str, n: int) -> None:
    x = torch.randn(16, 8, dtype=torch.float64)
    gm = traced(chain(), x)
    gc = graph_costs(gm, [x], kind)
    policy = autosplit(n, cost=kind)
    assignment = policy(gm, [x])
    assert policy.stage_costs is not None and len(policy.stage_costs) == n
    assert max(policy.stage_costs) == pytest.approx(brute_force(gc, n), rel=1e-12)
    order = [assignment[v] for v in gm.graph.nodes if v.op in COMPUTE_OPS]
    assert order == sorted(order) and set(order) == set(range(n))  # contiguous, none empty


def _random_costs(rng: np.random.Generator, size: int) -> GraphCosts:
    cuttable = rng.random(size + 1) > 0.2
    cuttable[0] = cuttable[-1] = True
    return GraphCosts(
        nodes=[None] * size,  # type: ignore[list-item]
        cost=rng.integers(0, 50, size).astype(float) ** 2,
        param_bytes=rng.integers(0, 1000, size).astype(float),
        live_bytes=rng.integers(0, 300, size + 1).astype(float),
        cuttable=cuttable,
        kind="flops",
    )


def test_partition_exact_on_random_sequences() -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        gc = _random_costs(rng, int(rng.integers(6, 14)))
        n = int(rng.integers(1, 5))
        if len(cut_positions(gc)) - 1 < n:
            continue
        _, costs = best_contiguous(gc, n)
        assert max(costs) == pytest.approx(brute_force(gc, n)), trial
        limit = min_memory_limit(gc, n) * (1.0 + rng.random())
        _, costs = best_contiguous(gc, n, memory_limit=limit)
        assert max(costs) == pytest.approx(brute_force(gc, n, limit)), trial


def test_memory_limit_infeasible_names_smallest_feasible() -> None:
    x = torch.randn(16, 8, dtype=torch.float64)
    gm = traced(chain(), x)
    gc = graph_costs(gm, [x], "flops")
    need = min_memory_limit(gc, 2)
    with pytest.raises(ValueError, match=r"memory_limit=.*infeasible.*smallest feasible limit is") as err:
        autosplit(2, cost="flops", memory_limit=need * 0.9)(gm, [x])
    assert f"{need:,.0f}" in str(err.value)
    policy = autosplit(2, cost="flops", memory_limit=need)
    policy(gm, [x])
    assert policy.stage_costs is not None and len(policy.stage_costs) == 2


def test_time_costs_cover_every_node_and_leave_model_untouched() -> None:
    model = MLPStack(n=2).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    gm = traced(model, x)
    state = torch.random.get_rng_state()
    gc = graph_costs(gm, [x], "time", repeats=2)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    linears = [c for v, c in zip(gc.nodes, gc.cost) if "linear" in str(v.target)]
    assert linears and all(c > 0 for c in linears)


def test_equal_layers_gpt2_cuts_at_block_boundaries() -> None:
    model = gpt2(n_layer=4)
    x = torch.randint(0, 96, (4, 16))
    policy = split_equal_layers(2)
    pipe = pipeline(model, 2, example_args=(x,), split_policy=policy)
    fqns = [set(pipe.get_stage_module(s).state_dict()) for s in range(2)]
    assert any(k.startswith("transformer.h.1.") for k in fqns[0]) and not any(".h.2." in k for k in fqns[0])
    assert any(k.startswith("transformer.h.2.") for k in fqns[1]) and "transformer.ln_f.weight" in fqns[1]
    assert "transformer.wpe.weight" in fqns[0]


def test_equal_params_balances_parameter_bytes() -> None:
    model = MLPStack(n=4, d=8, hidden=64).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    policy = split_equal_params(2)
    pipeline(model, 2, example_args=(x,), split_policy=policy)
    assert policy.stage_costs is not None
    a, b = policy.stage_costs
    assert abs(a - b) / (a + b) < 0.2


def test_split_by_names_replays_a_split() -> None:
    model = MLPStack(n=3).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    first = autosplit(3, cost="flops")
    p1 = pipeline(model, 2, example_args=(x,), split_policy=first)
    p2 = pipeline(model, 2, example_args=(x,), split_policy=split_by_names(first.last_assignment))
    for s in range(3):
        assert p1.stage_infos[s].input_names == p2.stage_infos[s].input_names
        assert list(p1.get_stage_module(s).state_dict()) == list(p2.get_stage_module(s).state_dict())
    stale = {**first.last_assignment, "linear_99": 2}  # a name from another graph (another depth)
    with pytest.raises(ValueError, match=r"split_by_names: 1 of its \d+ names are not operations of this graph "
                                         r"\(\['linear_99'\]\); 'linear_99': did you mean 'linear_\d'\?"):
        pipeline(model, 2, example_args=(x,), split_policy=split_by_names(stale))


def test_split_report_table() -> None:
    model = MLPStack(n=4).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    pipe = pipeline(model, 2, example_args=(x,), split_policy=autosplit(2, cost="params"))
    text = pipe.split_report()
    assert "cost (params)" in text and "->1" in text and "bottleneck: stage" in text
    assert len(text.splitlines()) == 4
    marked = pipeline(model, 2, example_args=(x,), split_spec={"blocks.1": SplitPoint.END})
    assert "cost (flops)" in marked.split_report()


# ---- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, 2.0, "2", True])
@pytest.mark.parametrize("factory", [autosplit, graphsplit, split_equal_params, split_equal_layers])
def test_bad_num_stages(factory: object, n: object) -> None:
    with pytest.raises(ValueError, match=r"num_stages=.*must be an int >= 1"):
        factory(n)  # type: ignore[operator]


def test_bad_options() -> None:
    with pytest.raises(ValueError, match=r"cost='speed'.*unknown cost kind.*'flops', 'params', 'time'"):
        autosplit(2, cost="speed")
    with pytest.raises(ValueError, match="memory_limit=-5"):
        autosplit(2, memory_limit=-5)
    with pytest.raises(ValueError, match="unknown cost kind"):
        graphsplit(2, cost="latency")
    with pytest.raises(ValueError, match=r"balance=-0\.1"):
        graphsplit(2, balance=-0.1)
    with pytest.raises(ValueError, match="time_limit=0"):
        graphsplit(2, time_limit=0)
    with pytest.raises(ValueError, match="repeats=0"):
        autosplit(2, repeats=0)


def test_too_many_stages() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    for policy in (autosplit(9, cost="flops"), graphsplit(9, cost="flops"), split_equal_params(9)):
        with pytest.raises(ValueError, match=r"\(9\): the traced graph has \d+ compute nodes and allows at most \d+"):
            pipeline(model, 1, example_args=(x,), split_policy=policy)


def test_equal_layers_errors() -> None:
    x = torch.randn(4, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="no repeated layers found"):
        pipeline(MyNetwork().double(), 1, example_args=(x,), split_policy=split_equal_layers(2))
    y = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"found only 2 repeated layers under 'blocks'.*num_stages <= 2"):
        pipeline(MLPStack(n=2).double(), 1, example_args=(y,), split_policy=split_equal_layers(3))


class _Blk(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.b(torch.tanh(self.a(x)))
        return h if mem is None else h + mem


class _EncDec(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleList(_Blk() for _ in range(4))
        self.dec = nn.ModuleList(_Blk() for _ in range(4))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x
        for b in self.enc:
            m = b(m)
        h = x
        for b in self.dec:
            h = b(h, m)
        return self.head(h)


def _layers_per_stage(pipe: object, prefixes: tuple[str, ...]) -> list[list[str]]:
    mods = [pipe.get_stage_module(s) for s in range(pipe.num_stages)]  # type: ignore[attr-defined]
    return [sorted({".".join(k.split(".")[:2]) for k in m.state_dict() if k.startswith(prefixes)}) for m in mods]


def test_equal_layers_balances_every_block_list() -> None:
    torch.manual_seed(0)
    pipe = pipeline(_EncDec().double(), 2, (torch.randn(4, 8, dtype=torch.float64),), split_policy=split_equal_layers(4))
    assert _layers_per_stage(pipe, ("enc", "dec")) == [["enc.0", "enc.1"], ["enc.2", "enc.3"], ["dec.0", "dec.1"],
                                                       ["dec.2", "dec.3"]]


def test_equal_layers_takes_consecutive_sequentials_and_a_top_level_one() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64)
    net = nn.Sequential()
    net.add_module("layer1", nn.Sequential(_Blk(), _Blk()))
    net.add_module("layer2", nn.Sequential(_Blk(), _Blk()))
    pipe = pipeline(net.double(), 2, (x,), split_policy=split_equal_layers(2))
    assert _layers_per_stage(pipe, ("layer",)) == [["layer1.0", "layer1.1"], ["layer2.0", "layer2.1"]]
    top = nn.Sequential(*(_Blk() for _ in range(6))).double()
    pipe = pipeline(top, 2, (x,), split_policy=split_equal_layers(3))
    assert [sorted({k.split(".")[0] for k in pipe.get_stage_module(s).state_dict()}) for s in range(3)] == [
        ["0", "1"], ["2", "3"], ["4", "5"]]

"""Tracing and splitting: markers, split specs, edges (skip, user inputs), FQNs, tied weights, printing."""

from __future__ import annotations

import torch
from models import MarkedMLP, MLPStack, SkipNet, TwoInputs, gpt2

from pippy import SplitPoint, annotate_split_points, pipe_split, pipeline
from pippy.frontend.split import USER, InputRef


def test_pipe_split_is_noop_eagerly() -> None:
    model = MarkedMLP(3, 1)
    x = torch.randn(2, 8)
    ref = MLPStack(3)
    ref.load_state_dict(model.state_dict())
    assert torch.equal(model(x), ref(x))
    pipe_split()  # callable outside any model too


def test_markers_and_spec_give_same_stages() -> None:
    x = torch.randn(4, 8)
    a = pipeline(MarkedMLP(4, 2), 2, (x,))
    b = pipeline(MLPStack(4), 2, (x,), split_spec={"blocks.1": SplitPoint.END})
    c_model = MLPStack(4)
    annotate_split_points(c_model, {"blocks.2": SplitPoint.BEGINNING})
    c = pipeline(c_model, 2, (x,))
    for p in (a, b, c):
        assert p.num_stages == 2
        assert sorted(p.get_stage_module(0).state_dict()) == [f"blocks.{i}.{j}.{t}" for i in (0, 1) for j in (0, 2) for t in ("bias", "weight")]
        assert "head.weight" in p.get_stage_module(1).state_dict()


def test_stage_state_dict_uses_original_fqns_and_values() -> None:
    model = MLPStack(4)
    pipe = pipeline(model, 2, (torch.randn(4, 8),), split_spec={"blocks.1": SplitPoint.END})
    full = model.state_dict()
    for i in range(pipe.num_stages):
        for k, v in pipe.get_stage_module(i).state_dict().items():
            assert torch.equal(v, full[k]), k


def test_skip_edge_goes_straight_to_last_stage() -> None:
    pipe = pipeline(SkipNet(4), 2, (torch.randn(4, 8),))
    assert pipe.num_stages == 4
    assert pipe.deps() == {0: (), 1: (0,), 2: (1,), 3: (0, 2)}
    last = pipe.stage_infos[3]
    assert InputRef(0, 0) in last.inputs
    assert "(skip)" in repr(pipe)


def test_user_inputs_route_through_stage_zero() -> None:
    x, y, b = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2)
    pipe = pipeline(TwoInputs(), 2, (x, y), {"bias": b})
    s0, s2 = pipe.stage_infos[0], pipe.stage_infos[2]
    assert [r.src_stage for r in s0.inputs] == [USER, USER, USER]
    assert all(r.src_stage != USER for r in s2.inputs)  # the kwarg arrives from stage 0
    assert any(r.src_stage == 0 for r in s2.inputs)
    flat = pipe.flatten_inputs((x[:2], y[:2]), {"bias": b[:2]})
    assert len(flat) == 3


def test_print_shows_submods_and_flow() -> None:
    pipe = pipeline(MarkedMLP(3, 1), 2, (torch.randn(4, 8),))
    text = repr(pipe)
    for i in range(3):
        assert f"submod_{i}" in text
    assert "submod_0 -> submod_1" in text and "float32[2, 8]" in text


def test_gpt2_tied_weights_keep_both_names() -> None:
    model = gpt2(n_layer=2)
    pipe = pipeline(model, 2, (torch.randint(0, 96, (4, 16)),), split_spec={"transformer.h.0": SplitPoint.END})
    s0 = pipe.get_stage_module(0).state_dict()
    s1 = pipe.get_stage_module(1).state_dict()
    assert "transformer.wte.weight" in s0 and "lm_head.weight" in s1
    assert "lm_head.weight" not in s0 and "transformer.wte.weight" not in s1
    assert [sp.stages for sp in pipe.shared if sp.requires_grad] == [(0, 1)]
    keys = set(s0) | set(s1)
    assert keys == set(model.state_dict())

"""CostModel: defaults, JSON round trip, rescaling."""

import json
import math

import pytest

from pippy.sim.cost import CostModel, StageCost


def test_uniform_and_b_is_i_plus_w() -> None:
    c = CostModel.uniform(3, f=1, i=2, w=3, act_bytes=5)
    assert c.num_stages == 3
    assert c.stages[1].b == 5.0
    assert c.stages[0].grad_out_bytes == 0.0
    assert c.transfer_time(100) == 0.0


def test_measured_full_backward_and_tapped_forward() -> None:
    c = StageCost(f=1, i=2, w=3, fused_b=4, split_f=1.5)
    assert c.b == 4.0 and c.forward_time(False) == 1.0 and c.forward_time(True) == 1.5
    assert StageCost(f=1, i=2, w=3).forward_time(True) == 1.0  # unmeasured: the plain forward
    half = c.scaled(0.5)
    assert (half.b, half.forward_time(True)) == (2.0, 0.75)
    merged = CostModel(stages=[c, StageCost(f=1, i=1, w=1)]).rebin(1).stages[0]
    assert merged.b == 6.0 and merged.forward_time(True) == 2.5  # the unmeasured stage adds i + w and f


def test_transfer_time() -> None:
    c = CostModel(stages=[StageCost()], latency=0.5, bandwidth=10.0)
    assert c.transfer_time(20) == pytest.approx(2.5)
    assert c.transfer_time(0) == 0.5


def test_json_round_trip(tmp_path) -> None:
    c = CostModel(
        stages=[StageCost(f=1, i=2, w=3, act_bytes=4, send_bytes=5, grad_bytes=6, w_act_bytes=1, static_bytes=9,
                          fused_b=4, split_f=1.5)],
        latency=1e-5,
        bandwidth=1e9,
        microbatches=4,
        overhead=2e-4,
    )
    p = tmp_path / "c.json"
    c.to_json(p)
    assert CostModel.from_json(p) == c
    inf = CostModel.uniform(2)
    inf.to_json(p)
    assert json.loads(p.read_text())["bandwidth"] is None
    assert math.isinf(CostModel.from_json(p).bandwidth)


def test_json_errors(tmp_path) -> None:
    p = tmp_path / "bad.json"
    p.write_text('{"stages": [{"f": 1, "flops": 2}]}')
    with pytest.raises(ValueError, match="flops"):
        CostModel.from_json(p)
    p.write_text('{"stages": [{"f": 1}], "overhead": -1}')
    with pytest.raises(ValueError, match="overhead must be a finite number of seconds"):
        CostModel.from_json(p)
    p.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        CostModel.from_json(p)


def test_for_microbatches_scales_linearly() -> None:
    c = CostModel(stages=[StageCost(f=4, i=4, w=4, act_bytes=8, static_bytes=3)], microbatches=2, latency=1)
    d = c.for_microbatches(4)
    assert (d.stages[0].f, d.stages[0].act_bytes, d.stages[0].static_bytes, d.latency) == (2, 4, 3, 1)
    assert CostModel.uniform(2, f=4).__class__(stages=c.stages, overhead=0.5).rebin(4).for_microbatches(8).overhead == 0.5


def test_rebin_conserves_totals() -> None:
    c = CostModel(stages=[StageCost(f=1, act_bytes=2, send_bytes=7), StageCost(f=3, act_bytes=4, send_bytes=9)])
    up = c.rebin(4)
    assert [s.f for s in up.stages] == [0.5, 0.5, 1.5, 1.5]
    assert [s.send_bytes for s in up.stages] == [7, 7, 9, 9]
    down = c.rebin(1)
    assert down.stages[0].f == 4 and down.stages[0].act_bytes == 6 and down.stages[0].send_bytes == 9
    odd = CostModel.uniform(3, f=1).rebin(2)
    assert sum(s.f for s in odd.stages) == pytest.approx(3)

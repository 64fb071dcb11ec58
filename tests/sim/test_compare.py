"""Prediction vs measurement: both trace formats load, the tables line up, the CLI profile command runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pippy.cli import main
from pippy.schedules.generators import one_f_one_b, zb_h1
from pippy.schedules.lower import lower
from pippy.sim.compare import from_chrome_trace, kind_table, load_timeline, predict_vs_measure
from pippy.sim.cost import CostModel
from pippy.sim.render import to_chrome_trace, write_chrome_trace
from pippy.sim.simulate import simulate
from pippy.sim.timeline import Timeline


def _key(tl: Timeline) -> list[tuple[int, str, float, float]]:
    return sorted((e.rank, str(e.action), round(e.start, 9), round(e.end, 9)) for e in tl.events)


def test_chrome_round_trip_keeps_every_event() -> None:
    sch = lower(zb_h1(3, 6))
    tl = simulate(sch, CostModel.uniform(3, f=1e-3, i=2e-3, w=1e-3, latency=1e-4)).timeline
    back = from_chrome_trace(to_chrome_trace(tl))
    assert back.num_ranks == 3
    assert _key(back) == _key(tl.normalized())
    assert back.bubbles() == pytest.approx(tl.bubbles())


def test_load_timeline_reads_both_formats(tmp_path: Path) -> None:
    tl = simulate(one_f_one_b(2, 4), CostModel.uniform(2)).timeline
    tl.to_json(tmp_path / "tl.json")
    write_chrome_trace(tl, tmp_path / "chrome.json")
    a, b = load_timeline(tmp_path / "tl.json"), load_timeline(tmp_path / "chrome.json")
    assert _key(a) == _key(b) and a.step_time == b.step_time == pytest.approx(tl.step_time)
    (tmp_path / "bad.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match=r"bad\.json"):
        load_timeline(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_timeline(tmp_path / "broken.json")


def test_predict_vs_measure_reports_error_and_per_action() -> None:
    sch = one_f_one_b(2, 4)
    costs = CostModel.uniform(2, f=1.0, i=1.0, w=1.0)
    slower = simulate(sch, CostModel.uniform(2, f=1.1, i=1.1, w=1.1)).timeline  # a "measurement" 10% slower
    text = predict_vs_measure(sch, costs, slower)
    assert "step time" in text and "-9.1%" in text
    assert "bubble rank 0" in text and "bubble rank 1" in text
    assert "stage 1 B" in text
    coarse = CostModel.uniform(1, f=2.0, i=2.0, w=2.0)  # re-cut to the schedule's 2 stages
    assert "+0.0%" in predict_vs_measure(sch, coarse, simulate(sch, costs).timeline, per_action=False)
    assert "n/a" in kind_table(slower, Timeline([], 2))


def test_cli_trace_compare_and_profile(capsys, tmp_path: Path) -> None:
    tl = simulate(lower(one_f_one_b(2, 4)), CostModel.uniform(2, f=1e-3)).timeline
    tl.to_json(tmp_path / "pred.json")
    write_chrome_trace(tl, tmp_path / "meas.json")
    assert main(["trace-compare", str(tmp_path / "pred.json"), str(tmp_path / "meas.json"), "--per-action"]) == 0
    out = capsys.readouterr().out
    assert "+0.0%" in out and "stage 0 F" in out
    assert main(["profile", "--help"]) == 0 and "usage: pippy profile" in capsys.readouterr().out
    assert main(["profile"]) == 0 and "pippy.sim.profile" in capsys.readouterr().out
    costs = tmp_path / "c.json"
    assert main(["profile", "--demo", "mlp", "--repeats", "1", "-m", "2", "-o", str(costs)]) == 0
    assert "stage" in capsys.readouterr().out
    c = CostModel.from_json(costs)
    assert c.num_stages == 2 and c.microbatches == 2 and all(s.f > 0 for s in c.stages)

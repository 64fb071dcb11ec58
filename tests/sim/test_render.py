"""Renderers and Timeline: text rows, ANSI switch, Chrome trace, PNG, compare table, JSON."""

import json

import pytest

from pippy.schedules.generators import one_f_one_b, zbv
from pippy.schedules.ir import Action
from pippy.sim.cost import CostModel
from pippy.sim.render import compare_table, render_png, render_text, to_chrome_trace, write_chrome_trace
from pippy.sim.simulate import simulate
from pippy.sim.timeline import Event, Timeline


def _tl() -> Timeline:
    return simulate(one_f_one_b(4, 8), CostModel.uniform(4)).timeline


def test_timeline_helpers_and_offset() -> None:
    ev = [Event(0, Action.parse("0F0"), 100.0, 101.0), Event(1, Action.parse("1F0"), 101.0, 102.0),
          Event(1, Action.parse("1SEND_F0"), 102.0, 102.0)]
    t = Timeline(ev, 2)
    assert t.step_time == 2.0
    assert t.busy_time(1) == 1.0
    assert t.bubbles() == [0.5, 0.5]
    assert t.normalized().origin == 0.0


def test_timeline_json_round_trip(tmp_path) -> None:
    t = _tl()
    p = tmp_path / "t.json"
    t.to_json(p)
    back = Timeline.from_json(p)
    assert back.events == t.events and back.num_ranks == 4
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a timeline"):
        Timeline.from_json(tmp_path / "x.json")


def test_text_one_row_per_rank_and_color_switch() -> None:
    plain = render_text(_tl(), color=False)
    rows = [ln for ln in plain.splitlines() if ln.startswith("rank ")]
    assert len(rows) == 4
    assert "\x1b[" not in plain
    assert "F0" in rows[0] and "B7" in rows[3]
    assert rows[3].split("|")[1].startswith("...")  # rank 3 waits for the pipeline to fill
    assert "\x1b[" in render_text(_tl(), color=True)


def test_text_fits_the_terminal_in_pages_and_keeps_every_label(monkeypatch) -> None:
    """Rows were capped at 160 columns whatever the terminal (so they wrapped), and rounding to under two
    cells dropped micro-batch numbers ("F2" shown as "F", read as "FB1" beside "B1")."""
    import re

    monkeypatch.setenv("COLUMNS", "80")
    for sched, m in ((one_f_one_b(4, 8), 8), (one_f_one_b(2, 200), 200)):
        text = render_text(simulate(sched, CostModel.uniform(sched.num_ranks)).timeline, color=False)
        lines = text.splitlines()
        assert max(len(ln) for ln in lines[:-1]) <= 80, sched.name  # (the legend is one line of text)
        rank0 = "".join(ln.split("|")[1] for ln in lines if ln.startswith("rank 0 "))
        if m == 8:
            assert sorted(re.findall(r"[FB]\d+", rank0)) == sorted(f"{k}{i}" for k in "FB" for i in range(m))
            assert re.search(r"[FB](?!\d)", rank0) is None  # no kind letter without its micro-batch


def test_text_marks_later_stage_lower_case() -> None:
    t = simulate(zbv(2, 2), CostModel.uniform(4)).timeline
    assert "f0" in render_text(t, color=False)


def test_chrome_trace_one_track_per_rank(tmp_path) -> None:
    p = tmp_path / "trace.json"
    write_chrome_trace(_tl(), p)
    d = json.loads(p.read_text())
    xs = [e for e in d["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in xs} == {0, 1, 2, 3}
    names = {e["tid"]: e["args"]["name"] for e in d["traceEvents"] if e["name"] == "thread_name"}
    assert names == {r: f"rank {r}" for r in range(4)}
    first = min(xs, key=lambda e: e["ts"])
    assert first["ts"] == 0 and first["dur"] == pytest.approx(1e6)  # 1 s -> microseconds
    assert to_chrome_trace(Timeline([], 1))["traceEvents"][0]["ph"] == "M"


def test_png_is_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    p = tmp_path / "t.png"
    render_png(_tl(), p)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_table() -> None:
    pred = _tl()
    meas = Timeline([Event(e.rank, e.action, 5 + 1.1 * e.start, 5 + 1.1 * e.end) for e in pred.events], 4)
    out = compare_table(pred, meas)
    assert "step time" in out and "-9.1%" in out
    assert sum(1 for ln in out.splitlines() if ln.startswith("bubble rank")) == 4

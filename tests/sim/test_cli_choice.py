"""The CLI shows and simulates what the runtime runs: ZB-V chosen as ScheduleZBV chooses, runtime_form compacted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pippy.cli import main
from pippy.schedules.generators import SCHEDULES
from pippy.schedules.lower import runtime_form
from pippy.schedules.render_grid import grid
from pippy.schedules.zero_bubble import zbv
from pippy.sim.choose import zbv_for_costs
from pippy.sim.compact import compact_w
from pippy.sim.cost import CostModel, StageCost
from pippy.sim.render import format_time
from pippy.sim.simulate import simulate


def _out(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_show_zbv_is_the_runtime_choice(capsys: pytest.CaptureFixture[str]) -> None:
    # p=6, m=8: the runtime form favours "whole" (the fused-only judgement used to pick "split")
    out = _out(capsys, "show", "zbv", "-p", "6", "-m", "8")
    assert zbv_for_costs(6, 8) == zbv(6, 8, "whole")
    assert out.rstrip("\n") == grid(zbv(6, 8, "whole"))


def test_simulate_predicts_the_runtime_form(capsys: pytest.CaptureFixture[str]) -> None:
    out = _out(capsys, "simulate", "zbv", "-p", "3", "-m", "6", "--no-color")
    costs = CostModel.uniform(3).rebin(6)
    want = simulate(compact_w(runtime_form(zbv_for_costs(3, 6)), costs), costs).step_time
    assert f"step time: {format_time(want, units=True)} " in out  # no --costs: unit costs, in units
    rank0 = out.splitlines()[0]
    assert rank0.startswith("rank 0 |") and "B0" in rank0
    assert "I" not in rank0 and "W" not in rank0  # stage 0 (upper case) runs whole B's, as the runtime does
    assert any(a.stage == 0 and a.kind.value == "I" for a in zbv_for_costs(3, 6).actions[0])  # generated: split


def test_costs_file_picks_the_zbv_order(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "dear_b.json"
    dear_b = CostModel(stages=[StageCost(f=1, i=1, w=1, fused_b=3.0)] * 4, microbatches=16)
    dear_b.to_json(path)
    out = _out(capsys, "show", "zbv", "-p", "2", "-m", "16")
    assert out.rstrip("\n") == grid(zbv(2, 16, "whole"))  # default costs
    out = _out(capsys, "simulate", "zbv", "-p", "2", "-m", "16", "--costs", str(path), "--no-color")
    costs = dear_b.for_microbatches(16)
    assert zbv_for_costs(2, 16, costs) == zbv(2, 16, "split")
    want = simulate(compact_w(runtime_form(zbv(2, 16, "split")), costs), costs).step_time
    assert f"step time: {format_time(want)} " in out


def test_compare_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    out = _out(capsys, "compare", "-p", "2", "-m", "4")
    names = [m.group(1) for ln in out.splitlines() if (m := re.match(r"^(\S+)\s+\d", ln))]
    assert names == list(SCHEDULES)

"""Multi-process transparency: every schedule equals the unpipelined model (outputs, loss, grads), float64."""

from __future__ import annotations

import pytest
from cases import readme_example, transparency
from harness import run_ranks

TOL = 1e-10


def _check(reports: list[dict[str, dict[str, float]]], expect_keys: list[str]) -> None:
    for key in expect_keys:
        per_rank = [r[key] for r in reports]
        assert all(r["grad"] < TOL for r in per_rank), (key, per_rank)
        assert all(r["n_params"] > 0 for r in per_rank), (key, per_rank)
        last = [r for r in per_rank if "out" in r]
        assert len(last) == 1, key
        assert last[0]["out"] < TOL and last[0]["loss"] < TOL and last[0]["eval"] < TOL, (key, last[0])
        assert last[0]["n_losses"] == 4
        sched = key.split("/")[1]
        if sched == "gpipe":  # GPipe keeps every micro-batch's activations; 1F1B at most p on rank 0
            assert reports[0][key]["peak_live"] == 4
        elif sched == "1f1b":
            assert reports[0][key]["peak_live"] == len(reports)


def test_world2_single_stage_schedules(tmp_path: pytest.TempPathFactory) -> None:
    cases = [(m, s, 1) for m in ("mlp_spec", "mlp_marker", "gpt2") for s in ("gpipe", "1f1b")]
    cases += [("gpt2", "zb_h1", 1), ("mlp_spec", "zb_h2", 1), ("aux", "1f1b", 1), ("aux", "zb_h1", 1)]
    reports = run_ranks(tmp_path, 2, transparency, cases)
    _check(reports, [f"{m}/{s}/{k}" for m, s, k in cases])


def test_world3_skip_two_inputs_readme(tmp_path: pytest.TempPathFactory) -> None:
    cases = [(m, s, 1) for m in ("skip", "two_inputs", "mlp_spec") for s in ("gpipe", "1f1b")]
    reports = run_ranks(tmp_path, 3, transparency, cases)
    _check(reports, [f"{m}/{s}/{k}" for m, s, k in cases])
    errs = run_ranks(tmp_path, 3, readme_example)
    assert errs[-1] < TOL


def test_world2_multi_stage_schedules(tmp_path: pytest.TempPathFactory) -> None:
    scheds = ("interleaved_1f1b", "looped_bfs", "zbv", "dualpipev", "interleaved_zb")
    cases = [(m, s, 2) for m in ("mlp_spec", "skip", "gpt2") for s in scheds] + [("aux", "zbv", 2)]
    reports = run_ranks(tmp_path, 2, transparency, cases)
    _check(reports, [f"{m}/{s}/{k}" for m, s, k in cases])

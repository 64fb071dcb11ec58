"""Ranks must run the same thing: model code that differs is refused on every rank, and peers get the whole story."""

from __future__ import annotations

from typing import Any

import pytest
from agree_cases import agreement_cases
from harness import run_ranks


@pytest.fixture(scope="module")
def results(tmp_path_factory: Any) -> list[dict[str, Any]]:
    return run_ranks(tmp_path_factory.mktemp("agree"), 2, agreement_cases)


def test_same_code_traced_on_other_devices_runs(results: list[dict[str, Any]]) -> None:
    # the same model traced on the CPU on rank 0 and on the meta device on rank 1: not a mismatch
    assert [r["devices"][0] for r in results] == ["ok", "ok"], [r["devices"] for r in results]


def test_different_model_code_is_refused_on_every_rank(results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(results):
        kind, text = r["code"]
        assert kind != "ok", f"rank {rank} trained with another rank's different model code"
        assert "stage code" in text and "first at stage 1" in text, text
        assert "run the same model source" in text, text


def test_peers_get_every_ranks_line_of_a_disagreement(results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(results):
        kind, text = r["schedule"]
        assert kind != "ok"
        # the rank that learned of it from the other one gets the per-rank lines too, not a line ending in ':'
        assert 'rank 0: "Schedule1F1B"' in text and 'rank 1: "ScheduleGPipe"' in text, f"rank {rank}: {text}"

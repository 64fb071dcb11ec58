"""PipelineGradScaler: one loss scale and one skip decision on every pipeline rank (2 spawned ranks)."""

from __future__ import annotations

from harness import run_ranks
from scaler_cases import scaler_on_ranks


def test_an_overflow_on_the_last_stage_skips_the_step_on_every_rank(tmp_path) -> None:
    reports = run_ranks(tmp_path, 2, scaler_on_ranks, timeout=120)
    for rep in reports:
        assert rep["stepped"] == [True, False, True], rep  # step 2's inf (on rank 1 only) skips both ranks
        assert rep["scales"] == [8.0, 4.0, 4.0], rep  # backed off once, on both: the same scale everywhere

"""Checkpoints on 2 gloo ranks: resuming in another placement or split, stage by stage, or with one FQN in two stages."""

from __future__ import annotations

from ckpt_cases import resume_cases
from harness import run_ranks


def test_resumed_runs_on_two_ranks_equal_the_uninterrupted_ones(tmp_path) -> None:
    """Each case: the resumed stages equal the uninterrupted run bit for bit (float64), and each optimizer group keeps
    its own layer's learning rate (per-stage calls: ``merge`` gives every stage; shared FQN: each copy its own state)."""
    reports = run_ranks(tmp_path, 2, resume_cases, str(tmp_path / "ckpt"), timeout=300)
    for rank, rep in enumerate(reports):
        for case, got in rep.items():
            assert got["lrs_ok"] and got["diff"] == 0.0, (rank, case, got)

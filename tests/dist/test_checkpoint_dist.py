"""Checkpoints on 2 gloo ranks: resuming in another placement or split, stage by stage, or with one FQN in two stages;
a DCP load that fails on one rank raises on both at once."""

from __future__ import annotations

import re

from ckpt_cases import resume_cases
from harness import run_ranks


def test_resumed_runs_on_two_ranks_equal_the_uninterrupted_ones(tmp_path) -> None:
    """Each case: the resumed stages equal the uninterrupted run bit for bit (float64), and each optimizer group keeps
    its own layer's learning rate (per-stage calls: ``merge`` gives every stage; shared FQN: each copy its own state)."""
    reports = run_ranks(tmp_path, 2, resume_cases, str(tmp_path / "ckpt"), timeout=300)
    for rank, rep in enumerate(reports):
        # an FQN missing on rank 1 only: both ranks raise within seconds (the group's timeout is 90s, pippy's 60s)
        got = rep.pop("missing_on_one_rank")
        assert got["error"] is not None and got["secs"] < 20, (rank, got)
        assert re.search(rf"rank {rank}: checkpoint.load\(.*\) failed on rank \[1\], so every rank stops here "
                         rf"\(this rank's own load (went well|failed)\):\n  rank 1: KeyError: checkpoint .* holds no "
                         r"tensor for stage \d \['extra'\]", got["error"]), got["error"]
        if rank == 0:
            assert re.search(r"rank 0: checkpoint.load\(.*\) \(DCP load number \d+ of this rank\) waited 1s for the "
                             r"outcome of the load on ranks \[1\], which never came", got["alone"] or ""), got
        for case, got in rep.items():
            assert got["lrs_ok"] and got["diff"] == 0.0, (rank, case, got)

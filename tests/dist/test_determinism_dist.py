"""Same seed, same bits: every schedule, float32 and float64, with run-time bubble filling on, on 2 gloo ranks."""

from __future__ import annotations

from cases import MULTI, SINGLE
from determinism_cases import same_seed_twice
from harness import run_ranks


def test_same_seed_gives_bitwise_equal_losses_and_gradients(tmp_path) -> None:
    reports = run_ranks(tmp_path, 2, same_seed_twice)
    assert len(reports[0]) == 2 * (len(SINGLE) + len(MULTI))  # every schedule x 2 dtypes
    for rank, rep in enumerate(reports):
        assert all(rep.values()), (rank, {k: v for k, v in rep.items() if not v})

"""Variable sequence lengths over gloo: transparency with no retrace, and a bad length that fails both ranks fast."""

from __future__ import annotations

from dynamic_cases import LENGTHS, varying_lengths
from harness import run_ranks


def test_lengths_vary_over_gloo_without_retrace(tmp_path) -> None:
    res = run_ranks(tmp_path, 2, varying_lengths)
    for rank, rep in enumerate(res):
        for name in ("1f1b", "zbv"):
            assert len(rep[name]["errs"]) == len(LENGTHS)
            assert max(rep[name]["errs"]) < 1e-12, (rank, name, rep[name]["errs"])
            assert rep[name]["retraced"] == 0, (rank, name)
            assert rep[name]["params"] > 10, (rank, name)
    assert "rank 0, stage 0" in res[0]["bad"] and "dimension 1 is 300" in res[0]["bad"], res[0]["bad"]
    assert "rank 0" in res[1]["bad"] and "dimension 1 is 300" in res[1]["bad"], res[1]["bad"]
    assert res[1]["bad_s"] < 30, res[1]["bad_s"]  # told by rank 0, not its own timeout

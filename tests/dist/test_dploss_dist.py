"""pp 2 × dp 2: mean, sum and counted-mean losses give the plain model's gradients on the global batch (DDP, FSDP2, HSDP);
HSDP's DP ranks are checked to agree; profile_ranks(group=mesh) gives every DP replica the same costs."""

from __future__ import annotations

from dploss_cases import LOSSES, SCHEDS, WRAPS, dp_losses
from harness import run_ranks


def test_dp_losses_match_global_batch(tmp_path) -> None:
    reports = run_ranks(tmp_path, 4, dp_losses, timeout=600)
    bad = {}
    for rank, rep in enumerate(reports):
        for wrap in WRAPS:
            for sched in SCHEDS:
                for loss in LOSSES:
                    r = rep[f"{wrap}/{sched}/{loss}"]
                    if max(r["grad_err"], r["param_err"], r["loss_err"]) > 1e-10:
                        bad[(rank, wrap, sched, loss)] = r
        err = rep["hsdp_mismatch"]
        if "disagree on n_microbatches" not in err or f"rank {rank}" not in err:
            bad[(rank, "hsdp mismatch")] = err[:300]
        if rep["profile"]["error"]:
            bad[(rank, "profile flow")] = rep["profile"]["error"][:300]
        elif rep["profile"]["costs"] != reports[0]["profile"]["costs"]:  # one model on every rank
            bad[(rank, "profile flow")] = "costs differ from rank 0's"
    assert not bad, "\n".join(f"{k}: {v}" for k, v in bad.items())

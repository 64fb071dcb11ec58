"""dp 2 x pp 2 with DDP on every stage: exact gradients and AdamW steps, one all-reduce per bucket per step (any m)."""

from __future__ import annotations

from ddp_cases import MODES, SCHEDS, dp_pp_ddp
from harness import run_ranks


def test_ddp_stages_allreduce_once_per_step(tmp_path) -> None:
    out = tmp_path / "traces"
    out.mkdir()
    reports = run_ranks(tmp_path, 4, dp_pp_ddp, str(out), timeout=300)
    for rank, rep in enumerate(reports):
        for mode in MODES:
            for name in SCHEDS:
                r2, r4 = rep[f"{mode}/{name}/2"], rep[f"{mode}/{name}/4"]
                for r in (r2, r4):
                    assert r["grad_err"] < 1e-12 and r["param_err"] < 1e-12, (rank, mode, name, r)
                    # one bucket per stage here: one all-reduce per stage per step, never one per micro-batch
                    assert r["allreduces"] == [r["stages"]] * 3, (rank, mode, name, r)
        traces = rep["traces"]  # one file per pipeline (mesh rows: global ranks 0-1 and 2-3), none overwritten
        assert sorted(traces) == ["t.ranks0-1.json", "t.ranks2-3.json"], sorted(traces)
        assert "global ranks [0, 1]" in traces["t.ranks0-1.json"], traces["t.ranks0-1.json"][:300]
        err = rep["errors"]
        assert "has dimensions ('dp', 'pp')" in err["mesh"] and "no 'pipe' dimension" in err["mesh"], err["mesh"]
        assert "world size is 2 but the pipe has 3 stages" in err["pp_size"], err["pp_size"]
        assert "disagree on n_microbatches" in err["dp_m"] and "rank" in err["dp_m"], err["dp_m"]
        assert "disagree on action order (set by costs=, which must be the same on every rank)" in err["dp_costs"] \
            and "same micro-batch count, schedule and costs=" in err["dp_costs"], err["dp_costs"]

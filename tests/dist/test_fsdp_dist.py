"""dp 2 x pp 2 with FSDP2 on every stage: exact gradients, one reduction per stage per step (any m), DCP checkpoints."""

from __future__ import annotations

from fsdp_cases import BLOCKWISE, MS, SCHEDS, dp_pp_fsdp
from harness import run_ranks


def test_fsdp2_stages_sync_once_per_step(tmp_path) -> None:
    reports = run_ranks(tmp_path, 4, dp_pp_fsdp, str(tmp_path / "ckpt"), timeout=300)
    for rank, rep in enumerate(reports):
        for name in SCHEDS:
            for m in MS.get(name, (2, 4)):
                r = rep[f"{name}/{m}"]
                assert r["grad_err"] < 1e-12, (rank, name, m, r)
                assert r["reductions"] == r["stages"], (rank, name, m, r)  # not once per micro-batch
        for name in BLOCKWISE:  # fully_shard on each block of a stage (its original FQN), then on the stage
            for m in MS.get(name, (2, 4)):
                r = rep[f"{name}/{m}/blocks"]
                assert r["grad_err"] < 1e-12, (rank, name, m, r)
                assert r["groups"] > r["stages"] and r["reductions"] == r["groups"], (rank, name, m, r)
                assert r["param_err"] < 1e-12, (rank, name, m, r)  # after three AdamW steps
        assert "sharded (fully_shard / parallelize_module) before pipeline()" in rep["sharded_first"], rep
        assert "format='dcp'" in rep["torch_format"], rep["torch_format"]
        for name in ("1f1b", "zbv"):  # recompute="pointwise" (regions reading a parameter), then fully_shard
            r = rep[f"pointwise/{name}"]
            assert r["rewritten"] and r["grad_err"] < 1e-12, (rank, name, r)
            assert rep[f"tied/{name}"] < 1e-12, (rank, name, rep[f"tied/{name}"])  # tied copies' shards add up
        # sharded stages saved through DCP: merge loads strictly into the plain model; load restores the shards
        for key in ("checkpoint", "checkpoint/blocks"):
            assert rep[key]["merge_err"] == 0.0 and rep[key]["load_err"] == 0.0, rep[key]
            assert rep[key]["optim_err"] == 0.0 and rep[key]["lr_back"] == 1.0, rep[key]  # optimizer state restored


def test_fsdp2_mixed_precision_bf16_compute_fp32_reduce(tmp_path) -> None:
    from fsdp_cases import dp_pp_mixed

    for rank, rep in enumerate(run_ranks(tmp_path, 4, dp_pp_mixed, timeout=300)):
        for name in ("1f1b", "zbv"):  # torch.autocast around pipeline() and step(), FSDP2 stages
            assert rep.pop(f"autocast/{name}")["autocast_err"] < 2e-2, (rank, name)
        for name, r in rep.items():
            assert r["param_dtype"] == "torch.float32" and r["grad_dtype"] == "torch.float32", (rank, name, r)  # masters
            assert r["edge_dtypes"] == ["torch.bfloat16"], (rank, name, r)  # activations travel as computed: bf16
            assert r["rel_err"] < 2e-2, (rank, name, r)  # the plain model computing in bf16, within bf16 tolerance

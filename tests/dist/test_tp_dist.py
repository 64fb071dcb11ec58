"""pp 2 x tp 2: Llama blocks column/row parallel inside pipeline stages; gradients and AdamW steps equal the plain model."""

from __future__ import annotations

from harness import run_ranks
from tp_cases import SCHEDS, pp_tp


def test_tensor_parallel_blocks_inside_stages(tmp_path) -> None:
    reports = run_ranks(tmp_path, 4, pp_tp, timeout=300)
    for rank, rep in enumerate(reports):
        for name in SCHEDS:
            for m in (2, 4):
                r = rep[f"{name}/{m}"]
                assert r["blocks"] == 2 and r["sharded"] == 2 * 7, (rank, name, m, r)  # 7 projections per block
                assert r["grad_err"] < 1e-12 and r["param_err"] < 1e-12, (rank, name, m, r)  # clipped AdamW steps
                assert r["clip_err"] < 1e-12, (rank, name, m, r)  # the global norm, as on the plain model
        if rank < 2:  # pp rank 0 (global ranks 0, 1) runs the first GQA block: the error says why and what to do
            assert "stage 0 has tensor-parallel (DTensor) parameters" in rep["gqa"], rep["gqa"]
            assert "num_key_value_heads < num_attention_heads" in rep["gqa"], rep["gqa"]
        else:
            assert "another rank failed first" in rep["gqa"], rep["gqa"]
        # the pipeline group is a sub-group of the mesh: the message says which global ranks its numbers mean
        assert f"this process is global rank {rank}" in rep["gqa"] and "whose members are the global ranks" in rep["gqa"]

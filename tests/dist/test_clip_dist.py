"""clip_grad_norm_ across pipeline ranks equals torch.nn.utils.clip_grad_norm_ on the plain model (2 spawned ranks)."""

from __future__ import annotations

from clip_cases import clip_on_ranks
from harness import run_ranks


def test_clip_across_ranks_replicated_tie_and_two_stages_per_rank(tmp_path) -> None:
    for mode, v in (("replicate", 1), ("transmit", 2)):
        where = tmp_path / f"{mode}{v}"
        where.mkdir()
        reports = run_ranks(where, 2, clip_on_ranks, mode, v, timeout=120)
        for rank, rep in enumerate(reports):
            assert abs(rep["norm"] - rep["want"]) < 1e-12 * rep["want"], (mode, rank, rep)
            assert rep["grad_err"] < 1e-12, (mode, rank, rep)

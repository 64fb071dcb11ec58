"""HF models across two processes (gloo): BERT, Llama, T5 (split inside encoder and decoder); GPT-2 checkpoints."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from harness import run_ranks
from zoo_dist_cases import zoo_world2

TOL = 1e-10


def test_zoo_and_checkpoint_world2(tmp_path: pytest.TempPathFactory) -> None:
    cases = [("bert", "1f1b", 1), ("llama", "gpipe", 1), ("t5", "interleaved_1f1b", 2)]
    reports = run_ranks(tmp_path, 2, zoo_world2, cases, str(tmp_path), timeout=240)
    for name, sched, spr in cases:
        key = f"{name}/{sched}/{spr}"
        per_rank = [r["zoo"][key] for r in reports]
        assert all(r["grad"] < TOL and r["n_params"] > 0 for r in per_rank), (key, per_rank)
        (last,) = [r for r in per_rank if "loss" in r]
        tol = 1e-6 if last["loss_f32"] else TOL
        assert last["loss"] < tol and last["out"] < tol, (key, last)
    # GPT-2 trained 2 Adam steps on 2 ranks; each rank saved its stage (torch files and one DCP checkpoint);
    # the merged state_dict loads strictly into the unpipelined model and equals it; load() restores each stage
    for r in reports:
        assert all(v < 1e-10 for v in r["ckpt"].values()), r["ckpt"]

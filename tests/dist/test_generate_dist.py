"""Pipelined generation on 2 and 3 real gloo ranks: token for token ``model.generate``, clear errors, no hang."""

from __future__ import annotations

import pytest
import torch
from gen_cases import KINDS, early_eos, failures, matrix
from gen_cases import one_thread  # noqa: F401 - the fixture pytestmark uses
from harness import run_ranks


pytestmark = pytest.mark.usefixtures("one_thread")


def _cases(world: int) -> list[tuple[str, int, tuple[int, ...] | None, int | None]]:
    """Per model: greedy with groups 1, 2 and more groups than ranks, an EOS that ends some rows (and a group) early;
    and seeded sampling with groups in flight."""
    out: list[tuple[str, int, tuple[int, ...] | None, int | None]] = []
    for kind in KINDS:
        eos = early_eos(kind, 2)
        out += [(kind, 1, eos, None), (kind, 2, eos, None), (kind, 6 if world == 3 else 3, eos, None)]
        out.append((kind, 3, early_eos(kind, 2, 11), 11))
    if world == 3:
        out.append(("gpt2", 3, None, None))  # groups == ranks, no early stop
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_generate_equals_model_generate(tmp_path, world: int) -> None:
    cases = _cases(world)
    reports = run_ranks(tmp_path, world, matrix, cases)
    for key in reports[0]:
        per_rank = [r[key] for r in reports]
        assert all(eq for eq, _, _ in per_rank), (key, per_rank)
        assert len({shape for _, shape, _ in per_rank}) == 1, (key, per_rank)  # the same tensor on every rank


def test_bad_input_and_missing_rank(tmp_path) -> None:
    res = run_ranks(tmp_path, 2, failures)
    for r, got in enumerate(res):
        assert f"rank {r}, stage {r}" in got["groups"] and "groups=4 equal groups, got a batch of 6" in got["groups"]
        assert "expected max_new_tokens >= 1, got 0" in got["new"]
        assert "prompt + max_new_tokens exceeds the KV cache" in got["long"] and "7 + 11 = 18" in got["long"]
    msg = res[1]["timeout"]
    assert "timed out after 2s" in msg and "rank 1, stage 1, peer rank 0" in msg, msg
    assert "hidden states of group 0, token step 0" in msg and "must run on every rank" in msg, msg
    assert float(res[1]["seconds"]) < 30

"""Faults end every rank fast, with a message naming where: 2 and 3 ranks, 1F1B and interleaved 1F1B (see fault_cases)."""

from __future__ import annotations

import os
import queue
import time

import pytest
import torch.multiprocessing as mp
from fault_cases import SCENARIOS, TIMEOUT, worker

LIMIT = TIMEOUT + 10.0  # every rank must end this long after the fault at the latest
POSTED = ("raise_forward", "raise_backward", "wrong_shape", "wrong_dtype", "nan_loss", "spare_schedule",
          "build_fails")  # the failing rank posts


def _spawn(tmp_path, world: int, family: str) -> tuple[dict[str, dict[int, tuple]], list[int]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, family, str(tmp_path), q)) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[str, dict[int, tuple]] = {name: {} for name in SCENARIOS}
    expected = len(SCENARIOS) * world - 1  # the SIGKILLed rank never reports its last scenario
    deadline = time.monotonic() + 60 + len(SCENARIOS) * (LIMIT + 5)
    while sum(len(v) for v in got.values()) < expected and time.monotonic() < deadline:
        try:
            name, rank, *rest = q.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        got[name][rank] = tuple(rest)
    codes = []
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
        if p.is_alive():  # an orphan: fail, but do not leave it running
            p.kill()
            p.join()
            codes.append(-999)
        else:
            codes.append(p.exitcode)
    return got, codes


def _where(text: str) -> bool:
    """The message names a rank, a stage, an action and a micro-batch."""
    return all(w in text for w in ("rank ", "stage ", "action ", "micro-batch "))


@pytest.mark.parametrize(("world", "family"), [(2, "1f1b"), (3, "1f1b"), (2, "interleaved"), (3, "interleaved")])
def test_every_rank_ends_fast_with_a_message(tmp_path, world: int, family: str) -> None:
    got, codes = _spawn(tmp_path, world, family)
    victim = world - 1
    assert -999 not in codes, f"a rank never exited: {codes}"
    assert codes[victim] == -9 and all(c == 0 for r, c in enumerate(codes) if r != victim), codes
    report = []
    for name in SCENARIOS:
        ranks = got[name]
        want = set(range(world)) - ({victim} if name == "sigkill" else set())
        assert set(ranks) == want, f"{name}: reports from {sorted(ranks)}, expected {sorted(want)}"
        fault = min(r[4] for r in ranks.values() if r[4] is not None) if any(r[4] for r in ranks.values()) else None
        assert fault is not None or name == "sigkill", name
        fault = fault or min(r[2] for r in ranks.values())
        last_end = max(r[3] for r in ranks.values())
        report.append(f"{name}: last rank ended {last_end - fault:.2f}s after the fault")
        assert last_end - fault <= LIMIT, f"{name}: a rank ended {last_end - fault:.1f}s after the fault"
        for rank, (status, text, *_rest) in ranks.items():
            if name == "never_steps" and rank == victim:
                assert status == "skipped"
                continue
            if name == "build_fails" and rank == victim:  # its own error, raised while building
                assert status == "ValueError" and "injected failure building" in text, text
                continue
            assert status != "ok", f"{name}: rank {rank} finished its step as if nothing happened"
            assert f"rank {rank}" in text or "at rank" in text, f"{name} rank {rank}: {text}"
            if name.startswith("disagree"):
                assert "disagree on" in text or "another rank failed" in text, f"{name} rank {rank}: {text}"
            else:
                assert _where(text), f"{name} rank {rank}: {text}"
            if status in ("PipeCommError", "PipeTimeoutError", "PipeAbortedError"):
                assert "peer rank" in text, f"{name} rank {rank}: {text}"
            if rank != victim and name in POSTED:  # told by the failure board, not by a closed connection
                assert status == "PipeAbortedError" and "That rank says: rank " in text, f"{name} rank {rank}: {text}"
        if name == "nan_loss":
            last = [t for s, t, *_ in ranks.values() if "check_finite" in t]
            assert last and "micro-batch 2" in last[0], ranks
    print(f"world {world}, {family}:\n  " + "\n  ".join(report))
    os.environ.pop("PIPPY_TIMEOUT", None)

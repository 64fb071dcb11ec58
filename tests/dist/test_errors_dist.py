"""Errors under a real gloo group: wrong world size, and a bounded wait that names who waited for what."""

from __future__ import annotations

import os
import subprocess
import sys

from cases import error_cases
from harness import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_world_size_and_timeout_messages(tmp_path) -> None:
    res = run_ranks(tmp_path, 2, error_cases)
    for r in res:
        assert "world size is 2 but the pipe has 3 stages" in r["world"]
        assert "torchrun --nproc-per-node 3" in r["world"]
    msg = res[1]["timeout"]
    assert "rank 1, stage 1, action 1RECV_F0 (micro-batch 0), peer rank 0" in msg
    assert "timed out after 1s" in msg and "Expected activations from rank 0" in msg


def test_readme_example_runs_as_written() -> None:
    """examples/basic/example.py under torchrun with 3 ranks, exactly as a user would launch it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
           os.path.join(ROOT, "examples", "basic", "example.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 2: output (32, 10), max |diff| vs unpipelined model" in proc.stdout
    assert "submod_0" in proc.stdout and "submod_2" in proc.stdout

"""benchmarks/gpu_check.sh in its CPU mode: the script a GPU session runs must not rot where no GPU is."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_cpu_mode_runs_every_check() -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--cpu"], capture_output=True,
                          text=True, timeout=400, env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    passed = re.findall(r"^transparency (\w+)\s+(\d) stages on cpu: .*: PASS$", proc.stdout, re.M)
    assert len(passed) == 9 and {n for n, _ in passed} >= {"ScheduleGPipe", "ScheduleZBV", "ScheduleDualPipeV"}, out
    assert "FAIL" not in proc.stdout, out
    # two ranks print at once: their lines may run together
    assert len(re.findall(r"dist \w+\s+rank \d of 2 on cpu \(gloo\): max \|d grad\| \S+: PASS", proc.stdout)) == 4, out
    sides = re.findall(r"^bench (pippy|peer)\s+step\s+([\d.]+) ms\s+(\d+) tokens/s .*host syncs per step per rank "
                       r"\[(\d+), (\d+)\]", proc.stdout, re.M)
    assert [s[0] for s in sides] == ["pippy", "peer"], out
    assert sides[0][3:] == ("0", "0"), f"pippy forced host syncs: {out}"  # no .item() / synchronize per action
    assert "gpu_check: done" in proc.stdout


def test_gpu_check_reports_each_failed_section_and_goes_on() -> None:
    # a 1 s limit per section: every section times out (exit 124), each is named, and the script still ends
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "SECTION_TIMEOUT": "1"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--cpu"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for name in ("transparency", "dist", "bench"):
        assert re.search(rf"^{name}: FAILED \(exit \d+\)$", proc.stdout, re.M), proc.stdout
    assert proc.stdout.rstrip().endswith("gpu_check: FAILED: transparency dist bench"), proc.stdout


def test_gpu_mode_with_a_cpu_only_torch_says_how_to_point_python_at_a_cuda_one() -> None:
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch is built with CUDA")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "CPU-only torch" in proc.stdout and "torch.version.cuda is None" in proc.stdout, proc.stdout
    assert "PYTHON=/path/to/cuda-venv/bin/python benchmarks/gpu_check.sh" in proc.stdout, proc.stdout


def test_pippy_gives_up_before_the_section_is_killed(tmp_path) -> None:
    fake = tmp_path / "python"  # stands in for every Python call: prints the wait limit it was given
    fake.write_text("#!/usr/bin/env bash\necho \"PIPPY_TIMEOUT=$PIPPY_TIMEOUT\"\n")
    fake.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k != "PIPPY_TIMEOUT"}
    for extra, want in (({"SECTION_TIMEOUT": "40"}, "20"), ({}, "150"), ({"PIPPY_TIMEOUT": "7"}, "7")):
        env = {**base, "PYTHON": str(fake), **extra}
        proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--cpu"],
                              capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert set(re.findall(r"PIPPY_TIMEOUT=(\S*)", proc.stdout)) == {want}, (extra, proc.stdout)


def _gpu_check_module():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_bench_has_at_least_as_many_micro_batches_as_stages() -> None:
    gc = _gpu_check_module()
    assert gc.micro_batches(2, 8) == (4, 8)  # one GPU (2 stages) and 2..4 GPUs: 4, as before
    assert gc.micro_batches(4, 8) == (4, 8)
    assert gc.micro_batches(8, 8) == (8, 8)  # 8 GPUs: torch's Schedule1F1B needs 8
    assert gc.micro_batches(6, 8) == (6, 12)  # the batch raised to a multiple
    assert gc.micro_batches(16, 8) == (16, 16)


def test_one_host_sync_counts_once_and_the_harness_own_not_at_all() -> None:
    gc = _gpu_check_module()
    one_item_on_cuda = ["aten::item", "aten::_local_scalar_dense", "cudaMemcpyAsync", "cudaStreamSynchronize"]
    harness = ["cudaDeviceSynchronize"]
    assert sum(gc.count_syncs(one_item_on_cuda + harness, cuda=True, own=1).values()) == 1
    assert sum(gc.count_syncs(harness, cuda=True, own=1).values()) == 0
    assert sum(gc.count_syncs(["aten::item", "aten::_local_scalar_dense"], cuda=False).values()) == 1

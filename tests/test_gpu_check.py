"""benchmarks/gpu_check.sh in its CPU mode: the script a GPU session runs must not rot where no GPU is."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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

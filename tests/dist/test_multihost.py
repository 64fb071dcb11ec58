"""Two torchrun agents rendezvous over c10d on loopback (two "hosts" x 2 processes): dp 2 x pp 2 trains and matches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_hosts_dp2_pp2_fsdp_llama(tmp_path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    port = _free_port()
    cmd = [str(torchrun), "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"pippy-{port}",
           str(ROOT / "examples" / "train_3d.py"), "--dp", "2", "--pp", "2", "--steps", "2"]
    env = {**os.environ, "PIPPY_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    logs = [open(tmp_path / f"host{h}.log", "w+") for h in range(2)]  # noqa: SIM115
    hosts = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    try:
        codes = [h.wait(timeout=300) for h in hosts]
    finally:
        for h in hosts:
            if h.poll() is None:
                h.kill()
    out = ""
    for log in logs:
        log.seek(0)
        out += log.read()
        log.close()
    assert codes == [0, 0], out[-4000:]
    assert "check vs unpipelined model after 2 AdamW steps" in out and "-> OK" in out, out[-4000:]
    assert out.count("step   1/2") == 1  # one progress line per step (the last stage's DP rank 0)

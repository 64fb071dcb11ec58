"""Spawn a gloo process group (FileStore under a temp dir) and run one function on every rank."""

from __future__ import annotations

import os
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, store_path: str, fn: Callable[..., Any], args: tuple, q: Any) -> None:
    os.environ["PIPPY_TIMEOUT"] = os.environ.get("PIPPY_TEST_TIMEOUT", "60")
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=90))
    try:
        q.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path: Any, world: int, fn: Callable[..., Any], *args: Any, timeout: float = 240) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks; return the per-rank results or raise."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = os.path.join(str(tmp_path), f"store_{fn.__name__}_{world}")
    procs = [ctx.Process(target=_entry, args=(r, world, store, fn, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    for _ in range(world):
        try:
            rank, status, val = q.get(timeout=max(1.0, deadline - time.monotonic()))
        except queue.Empty:
            errors.append(f"no answer from some rank within {timeout}s (hang?)")
            break
        if status == "ok":
            results[rank] = val
        else:
            errors.append(f"rank {rank}:\n{val}")
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
    if errors or len(results) != world:
        raise AssertionError("distributed run failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]

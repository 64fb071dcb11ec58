"""Simulator scale benchmark: 1F1B with p=1024 ranks, m=4096 micro-batches (~8.4M actions).

Run: ``python benchmarks/sim_scale.py [p] [m]``. Prints the time to generate the schedule and the
time ``simulate`` takes (the figure the simulator is held to: under 10 s on a 2-core machine).
Not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import gc
import time

from pippy.schedules.generators import one_f_one_b
from pippy.sim.cost import CostModel
from pippy.sim.simulate import simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("p", type=int, nargs="?", default=1024, help="ranks (default 1024)")
    ap.add_argument("m", type=int, nargs="?", default=4096, help="micro-batches (default 4096)")
    a = ap.parse_args()
    p, m = a.p, a.m
    gc.disable()  # the generator makes millions of small objects
    t0 = time.perf_counter()
    sch = one_f_one_b(p, m)
    gc.freeze()  # keep the schedule's objects out of later collections (a real caller's gc has aged them)
    gc.enable()
    t1 = time.perf_counter()
    n = sum(len(r) for r in sch.actions)
    res = simulate(sch, CostModel.uniform(p))
    t2 = time.perf_counter()
    want = (p - 1) / (m + p - 1)
    print(f"1f1b p={p} m={m}: {n:,} actions")
    print(f"  generate: {t1 - t0:.2f} s")
    print(f"  simulate: {t2 - t1:.2f} s  ({1e9 * (t2 - t1) / n:.0f} ns/action)")
    print(f"  step time {res.step_time:g} (expected {3 * (m + p - 1)}), bubble {res.bubble[0]:.6f} (expected {want:.6f})")


if __name__ == "__main__":
    main()

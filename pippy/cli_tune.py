"""``python -m pippy tune``: the fastest fixed schedule and micro-batch count within a memory limit, or a built one.

    >>> import os, tempfile
    >>> from pippy.sim.cost import CostModel
    >>> path = os.path.join(tempfile.mkdtemp(), "c.json"); CostModel.uniform(2).to_json(path)
    >>> from pippy.cli import main
    >>> main(["tune", "--costs", path, "--memory-limit", "1e9", "--microbatches-choices", "4"])  # doctest: +ELLIPSIS
    recommended: dualpipev with 4 micro-batches on 2 ranks
    ...
    0
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any

from pippy.schedules.generators import SCHEDULES

if TYPE_CHECKING:
    from pippy.schedules.ir import Schedule
    from pippy.sim.cost import CostModel
    from pippy.sim.simulate import SimResult

__all__ = ["check_outputs", "cmd_tune", "fit_width", "load_costs", "make_named", "progress_line", "simulate_runtime"]


def make_named(name: str, p: int, m: int, costs_path: str | None = None) -> Schedule:
    """The named schedule; ZB-V's order is chosen as the runtime's ScheduleZBV chooses it.

    That is :func:`pippy.sim.choose.make_schedule_for` under the costs file (scaled to ``m``
    micro-batches), or under its default costs without one.
    """
    from pippy.sim.choose import make_schedule_for
    from pippy.sim.cost import CostModel

    costs = CostModel.from_json(costs_path).for_microbatches(m) if costs_path else None
    return make_schedule_for(name, p, m, costs)


def simulate_runtime(sch: Schedule, costs: CostModel, *, compact: bool = True, fuse: bool | str = True) -> SimResult:
    """Simulate ``sch`` as the runtime runs it with ``fuse_backward=fuse`` (W's compacted as for a generated
    schedule, or not, as for one given with ``schedule=`` or from a CSV; ``"auto"`` always compacts).

        >>> from pippy.schedules.zero_bubble import zbv
        >>> from pippy.sim.cost import CostModel
        >>> c = CostModel.uniform(4)
        >>> [simulate_runtime(zbv(2, 4, "split"), c, fuse=f).step_time for f in (True, False, "auto")]
        [28.0, 25.0, 25.0]
    """
    from pippy.schedules.lower import runtime_form
    from pippy.sim.choose import fastest_form
    from pippy.sim.compact import compact_w
    from pippy.sim.simulate import simulate

    if fuse == "auto":
        return simulate(fastest_form(sch, costs, mixed=True)[0], costs)
    form = runtime_form(sch, fuse=bool(fuse))
    return simulate(compact_w(form, costs) if compact else form, costs)


def load_costs(path: str | None, cmd: str) -> CostModel | None:
    """The cost model in ``path`` (None without one); ValueError naming the file when it is invalid or empty.

        >>> load_costs(None, "simulate") is None
        True
    """
    from pippy.sim.cost import CostModel

    if not path:
        return None
    base = CostModel.from_json(path)
    if not base.num_stages:
        raise ValueError(f"the cost file {path} has no stages; give one entry per stage (see pippy profile)")
    return base


def check_outputs(a: argparse.Namespace, cmd: str) -> None:
    """Before any work: ValueError naming the flag when an output file (--png, --trace, --save-timeline,
    --save-csv) cannot be written, or --png is given without matplotlib.

        >>> check_outputs(argparse.Namespace(png=None, trace="/nonexistent-dir/t.json"), "simulate")
        Traceback (most recent call last):
        ...
        ValueError: --trace /nonexistent-dir/t.json: its folder /nonexistent-dir does not exist; pass a writable path
    """
    from pippy.sim.render import path_problem

    for flag in ("png", "trace", "save_timeline", "save_csv"):
        path = getattr(a, flag, None)
        problem = path_problem(path) if path else None
        if problem:
            raise ValueError(f"--{flag.replace('_', '-')} {path}: {problem}; pass a writable path")
    if getattr(a, "png", None):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--png needs matplotlib: pip install matplotlib (or pippy[viz])") from None


def cmd_tune(a: argparse.Namespace) -> int:
    """``pippy tune``: the fastest fixed schedule within ``--memory-limit`` (see the module), then, with
    ``--synthesize``, the best built one. Returns 0 (a pick), 1 (nothing fits) or 2 (``--save-csv`` without
    ``--synthesize``); a bad costs file or output path raises ValueError naming it."""
    from pippy.sim.render import format_bytes, format_time

    if a.save_csv and not a.synthesize:
        print("tune: --save-csv writes the synthesized schedule; add --synthesize", file=sys.stderr)
        return 2
    check_outputs(a, "tune")
    base = load_costs(a.costs, "tune")
    assert base is not None  # --costs is required
    ranks = a.ranks or base.num_stages
    ok: list[tuple[float, str, int, float]] = []
    over: list[tuple[str, int, float, float]] = []
    invalid: list[str] = []
    for name in SCHEDULES:
        for m in a.microbatches_choices:
            try:
                sch = make_named(name, ranks, m, a.costs)
            except ValueError:
                invalid.append(f"{name}/m={m}")
                continue
            res = simulate_runtime(sch, base.for_microbatches(m).rebin(sch.num_stages))
            peak = max(res.peak_memory)
            if peak <= a.memory_limit:
                ok.append((res.step_time, name, m, peak))
            else:
                over.append((name, m, peak, res.step_time))
    limit = format_bytes(a.memory_limit)
    if not ok:
        low = min(over, key=lambda x: x[2]) if over else None  # (name, m, peak, step)
        print(f"no schedule fits {limit} per rank on {ranks} ranks" + (f"; the smallest peak is {low[0]} with m={low[1]}: {format_bytes(low[2])}" if low else ""))
        return _synthesized(a, base, ranks, None) if a.synthesize else 1
    ok.sort()
    t, name, m, peak = ok[0]
    print(f"recommended: {name} with {m} micro-batches on {ranks} ranks")
    print(f"  predicted step time {format_time(t)}, peak memory {format_bytes(peak)} per rank (limit {limit})")
    if len(ok) > 1:
        print("  it beat (fastest alternatives within the limit):")
        for t2, n2, m2, p2 in ok[1:6]:
            print(f"    {n2:<17} m={m2:<4} step {format_time(t2):>10} ({_rel(t2, t)})  peak {format_bytes(p2)}")
    if over:
        faster = sorted((x for x in over if x[3] < t), key=lambda x: x[3])
        print(f"  rejected for memory (> {limit}): {len(over)} configurations"
              + (", of which faster than the pick:" if faster else ", none of them faster than the pick"))
        for n2, m2, p2, t2 in faster[:5]:
            print(f"    {n2:<17} m={m2:<4} step {format_time(t2):>10} ({_rel(t2, t)})  peak {format_bytes(p2)}")
    if invalid:
        print(f"  not possible for {ranks} ranks: {', '.join(invalid[:8])}" + (" ..." if len(invalid) > 8 else ""))
    return _synthesized(a, base, ranks, (t, name, m)) if a.synthesize else 0


def _synthesized(a: argparse.Namespace, base: Any, ranks: int, pick: tuple[float, str, int] | None) -> int:
    """``tune --synthesize``: the best built schedule over the micro-batch counts and stage counts, vs the pick."""
    from pippy.schedules.lower import to_csv
    from pippy.schedules.render_grid import grid
    from pippy.sim.render import format_bytes, format_time
    from pippy.sim.synthesize import synthesize

    found = []
    todo = [(m, n) for m in a.microbatches_choices for n in (ranks, 2 * ranks)]
    t0 = time.monotonic()
    for k, (m, n) in enumerate(todo):
        if not getattr(a, "quiet", False):  # a line per candidate on stderr: a search can take minutes
            print(progress_line("synthesize", k, len(todo), time.monotonic() - t0, f"{m} micro-batches, {n} stages"),
                  file=sys.stderr, flush=True)
        costs = base.for_microbatches(m).rebin(n)
        try:
            syn = synthesize(ranks, m, costs, memory_limit=a.memory_limit)
        except ValueError:
            continue
        found.append((syn.step_time, m, n, syn, costs))
    if not found:
        print("synthesized: nothing fits the limit" + (f"; {a.save_csv} not written" if a.save_csv else ""))
        return 1
    t, m, n, syn, costs = min(found, key=lambda x: x[:3])
    versus = "" if pick is None else f" ({100 * (t - pick[0]) / pick[0]:+.1f}% vs {pick[1]} with m={pick[2]})"
    how = f"built by rule {syn.rule}" if syn.built else f"no built schedule beat the fixed {syn.rule}, so that one"
    print(f"synthesized: {n} stages, {m} micro-batches, {how}")
    print(f"  predicted step time {format_time(t)}{versus}, peak memory "
          f"{format_bytes(syn.peak_memory)} per rank; best fixed schedule for this m and stage count: "
          f"{syn.best_fixed} {format_time(syn.best_fixed_time)}")
    print(fit_width(grid(syn.schedule), shutil.get_terminal_size().columns,
                    "(cut to the terminal width; --save-csv writes the whole schedule)"))
    if a.save_csv:
        to_csv(syn.schedule, a.save_csv)
        as_saved = simulate_runtime(syn.schedule, costs, compact=False)
        print(f"  written to {a.save_csv}: ScheduleFromCSV({a.save_csv!r}, stages, loss_fn=...) runs it as saved "
              f"(predicted {format_time(as_saved.step_time)}); ScheduleSynthesized(stages, m, loss_fn, costs=..., "
              f"memory_limit=...) builds it in place with its W's moved into the gaps they fit "
              f"(predicted {format_time(t)})")
    return 0


def progress_line(what: str, done: int, total: int, elapsed: float, now: str) -> str:
    """One progress line: how far, how long so far and about how long is left (from the mean so far).

        >>> progress_line("synthesize", 2, 8, 30.0, "4 micro-batches, 2 stages")
        'synthesize: 3/8 (4 micro-batches, 2 stages), 30s so far, about 1.5 min left'
        >>> progress_line("synthesize", 0, 8, 0.0, "1 micro-batch")
        'synthesize: 1/8 (1 micro-batch), 0s so far'
    """
    left = elapsed / done * (total - done) if done else None
    eta = "" if left is None else f", about {left:.0f}s left" if left < 90 else f", about {left / 60:.1f} min left"
    return f"{what}: {done + 1}/{total} ({now}), {elapsed:.0f}s so far{eta}"


def fit_width(text: str, width: int, note: str) -> str:
    r"""``text`` with every line cut to ``width`` characters (``note`` added when any was cut).

        >>> print(fit_width("abcdef\nab", 4, "(cut)"))
        abc…
        ab
        (cut)
    """
    lines = text.splitlines()
    if all(len(ln) <= width for ln in lines):
        return text
    return "\n".join(ln if len(ln) <= width else ln[: max(1, width - 1)] + "…" for ln in lines) + "\n" + note


def _rel(t2: float, t: float) -> str:
    """``t2`` against ``t`` as a signed percentage ("+0.0%" when both are 0)."""
    return f"{100 * (t2 - t) / t:+.1f}%" if t > 0 else ("+0.0%" if t2 == t else "+inf%")

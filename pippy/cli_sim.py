"""``python -m pippy simulate``, ``compare`` and ``trace-compare``: predicted timelines and tables.

    >>> from pippy.cli import main
    >>> main(["simulate", "1f1b", "-p", "2", "-m", "2", "--no-color"])  # doctest: +ELLIPSIS
    rank 0 |...
    step time: 9 units   mean bubble: ...
    runs as: fuse_backward=True (the runtime's default)...
    0
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pippy.cli_tune import check_outputs, load_costs, make_named, simulate_runtime
from pippy.schedules.generators import SCHEDULES

if TYPE_CHECKING:
    from pippy.schedules.ir import Schedule
    from pippy.sim.cost import CostModel

__all__ = ["cmd_compare", "cmd_simulate", "cmd_trace_compare"]

_UNIT = "unit (F=I=W=1 per rank, B=2; times in cost units, not seconds; a schedule class given no costs= assumes B=1.5)"


def _costs_for(path: str | None, sch: Schedule, ranks: int, cmd: str) -> CostModel:
    """Load (or default) costs, scale to the micro-batch count and fit the schedule's stage count."""
    from pippy.sim.cost import CostModel

    base = load_costs(path, cmd) or CostModel.uniform(ranks)
    costs = base.for_microbatches(sch.n_microbatches) if path else base
    if path and len(base.stages) != sch.num_stages:
        print(f"note: {path} has {len(base.stages)} stage(s) and {sch.name} on {ranks} ranks has {sch.num_stages}: "
              "the costs are spread over the schedule's stages in proportion (profile the split you will run for "
              "per-stage costs)", file=sys.stderr)
    return costs.rebin(sch.num_stages)


def _fmt_list(xs: Sequence[float], fmt: str = "{:.1f}", limit: int = 16) -> str:
    shown = [fmt.format(x) for x in xs[:limit]]
    return "[" + ", ".join(shown) + (f", ... ({len(xs)} ranks)" if len(xs) > limit else "") + "]"


def _fuse_arg(text: str) -> bool | str:
    return "auto" if text == "auto" else text == "true"


_RUNS_AS = {
    True: "fuse_backward=True (the runtime's default)",
    False: "fuse_backward=False (every backward split into I and W)",
    "auto": "fuse_backward='auto' (the faster of fused and split, some B's split again, actions reordered)",
}


def cmd_simulate(a: argparse.Namespace) -> int:
    """``pippy simulate``: one step's timeline, step time, bubble and memory, as the runtime runs it."""
    from pippy.sim.render import format_bytes, format_time, render_png, render_text, write_chrome_trace

    check_outputs(a, "simulate")
    load_costs(a.costs, "simulate")
    sch = make_named(a.schedule, a.ranks, a.microbatches, a.costs)
    fuse = _fuse_arg(a.fuse_backward)
    res = simulate_runtime(sch, _costs_for(a.costs, sch, a.ranks, "simulate"), fuse=fuse)
    tl = res.timeline
    tl.unit_costs = units = not a.costs
    color = not a.no_color and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(render_text(tl, width=a.width, color=color))
    print(f"\n{sch.name}: {sch.num_ranks} ranks, {sch.num_stages} stages, {sch.n_microbatches} micro-batches")
    print(f"step time: {format_time(res.step_time, units)}   mean bubble: {100 * res.mean_bubble:.1f}%")
    split = sch.uses_split_backward()
    print(f"runs as: {_RUNS_AS[fuse]}" + ("" if split else "; no split backward here, so the option changes nothing")
          + ("; --fuse-backward auto gives what `compare` shows" if split and fuse != "auto" else ""))
    if units:
        print(f"costs: {_UNIT}; where a class's W's go depends on the costs: pass --costs (e.g. from `pippy profile`) "
              "for the order a class will run")
    print(f"{'rank':>6} {'busy':>10} {'bubble %':>9} {'peak memory':>12}")
    for r in range(sch.num_ranks):
        print(f"{r:>6} {format_time(res.busy[r], units):>10} {100 * res.bubble[r]:>9.1f} "
              f"{format_bytes(res.peak_memory[r]):>12}")
    if a.png:
        render_png(tl, a.png)
        print(f"wrote {a.png}")
    if a.trace:
        write_chrome_trace(tl, a.trace)
        print(f"wrote {a.trace}")
    if a.save_timeline:
        tl.to_json(a.save_timeline)
        print(f"wrote {a.save_timeline}" + (" (unit costs: trace-compare will say so)" if units else ""))
    return 0


def _n_b(s: Schedule) -> int:
    return sum(a.kind.value == "B" for acts in s.actions for a in acts)


def cmd_compare(a: argparse.Namespace) -> int:
    """``pippy compare``: every schedule simulated as ``fuse_backward='auto'`` runs it, and as the default does."""
    from pippy.schedules.lower import runtime_form
    from pippy.sim.bound import lower_bound
    from pippy.sim.choose import fastest_form
    from pippy.sim.render import format_bytes, format_time
    from pippy.sim.simulate import simulate

    load_costs(a.costs, "compare")
    units = not a.costs
    rows, notes = [], []
    for name in SCHEDULES:
        try:
            sch = make_named(name, a.ranks, a.microbatches, a.costs)
        except ValueError as e:
            notes.append(f"{name}: skipped ({e})")
            continue
        costs = _costs_for(a.costs, sch, a.ranks, "compare")
        form, fused = fastest_form(sch, costs, mixed=True)  # as fuse_backward="auto" runs it (W's compacted)
        kind = "-" if not sch.uses_split_backward() else ("split" if not fused else
                                                          "mixed" if _n_b(form) < _n_b(runtime_form(sch)) else "fused")
        default = simulate_runtime(sch, costs).step_time
        rows.append((name, simulate(form, costs), lower_bound(form, costs), kind, default))
    print(f"{a.ranks} ranks, {a.microbatches} micro-batches, costs: {a.costs or _UNIT}")
    print("step time: as fuse_backward='auto' runs it; default: as fuse_backward=True (the runtime's default, "
          "what `simulate` shows) runs it")
    head = (f"{'schedule':<17} {'step time':>11} {'default':>11} {'bound':>11} {'gap %':>6} {'bubble %':>9} {'I+W':>5} "
            f"{'max peak':>9}  peak memory per rank")
    print(head)
    print("-" * len(head))
    best = min((r.step_time for _, r, _, _, _ in rows), default=0.0)
    for name, res, bound, kind, default in rows:
        star = " *" if res.step_time == best else ""
        gap = 100 * (res.step_time / bound - 1) if bound > 0 else 0.0
        print(f"{name:<17} {format_time(res.step_time, units):>11} {format_time(default, units):>11} "
              f"{format_time(bound, units):>11} {gap:>6.1f} {100 * res.mean_bubble:>9.1f} {kind:>5} "
              f"{format_bytes(max(res.peak_memory)):>9}  {_fmt_list([float(x) for x in res.peak_memory], '{:.4g}')}{star}")
    print("(* fastest; bubble % is the mean over ranks; bound: no order of the same actions on the same ranks is "
          "faster (pippy.sim.bound); I+W: a split backward runs as fuse_backward='auto' runs it, the faster of I "
          "and W fused into one B where they are adjacent (fused; mixed: some B's kept split where that is faster, "
          "pippy.sim.unfuse) or kept split (split), with W's moved into the idle gaps they fit (pippy.sim.compact) "
          "and actions moved earlier on their rank where that is faster at no more memory (pippy.sim.reorder))")
    for n in notes:
        print(n)
    return 0


def cmd_trace_compare(a: argparse.Namespace) -> int:
    """``pippy trace-compare``: step time and bubbles of a prediction against a measured run."""
    from pippy.sim.compare import kind_table, load_timeline
    from pippy.sim.render import compare_table

    pred, meas = load_timeline(a.predicted), load_timeline(a.measured)
    if pred.num_ranks != meas.num_ranks:
        print(f"trace-compare: {a.predicted} has {pred.num_ranks} ranks but {a.measured} has {meas.num_ranks}; "
              "compare a prediction with a run of the same schedule and rank count", file=sys.stderr)
        return 2

    def shape(tl: Any) -> tuple[set[int], set[int]]:
        acts = [e.action for e in tl.events if e.action.kind.is_compute]
        return {x.stage for x in acts}, {x.mb for x in acts}

    (ps, pm), (ms, mm) = shape(pred), shape(meas)
    if (ps, pm) != (ms, mm):
        print(f"trace-compare: warning: the timelines are of different runs ({a.predicted}: stages {sorted(ps)}, "
              f"{len(pm)} micro-batches; {a.measured}: stages {sorted(ms)}, {len(mm)} micro-batches); compare a "
              "prediction with a run of the same schedule", file=sys.stderr)
    if pred.unit_costs != meas.unit_costs:
        unit = a.predicted if pred.unit_costs else a.measured
        print(f"trace-compare: warning: {unit} was simulated with unit costs (no --costs), so its times are cost "
              "units, not seconds; simulate with --costs from `pippy profile` to compare with a run", file=sys.stderr)
    print(compare_table(pred, meas))
    if a.per_action:
        print()
        print(kind_table(pred, meas))
    return 0

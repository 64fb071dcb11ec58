"""Prediction vs measurement: load a real run's trace (either JSON format) and lay it beside the simulation.

A real run (one process per rank, under torchrun) writes its trace on rank 0 with ``trace=``;
compare it with the simulation of the schedule it ran, under a cost model::

    sched = pippy.Schedule1F1B(stage, 8, loss_fn=F.mse_loss, trace="run.json")
    sched.step(x, target=y)
    if rank == 0:
        print(predict_vs_measure(sched.schedule, costs, load_timeline("run.json")))

``python -m pippy trace-compare pred.json run.json`` does the same from the command line.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from pippy.schedules.ir import Action, Kind, Schedule
from pippy.sim.cost import CostModel
from pippy.sim.render import compare_table, format_time
from pippy.sim.timeline import Event, Timeline

__all__ = ["from_chrome_trace", "kind_table", "load_timeline", "predict_vs_measure"]


def from_chrome_trace(data: dict[str, Any]) -> Timeline:
    """A Timeline from the Chrome/Perfetto JSON that ``write_chrome_trace`` (and ``trace="path"``) writes.

    ``"X"`` events named like actions (``1F0``, ``0SEND_B3``) become events on rank ``tid``
    (``ts``/``dur`` in microseconds); other events are ignored. The rank count is the number of
    ``thread_name`` tracks, or the highest rank + 1.

        >>> d = {"traceEvents": [{"name": "0F0", "ph": "X", "tid": 1, "ts": 0.0, "dur": 2000.0}]}
        >>> t = from_chrome_trace(d)
        >>> t.num_ranks, t.step_time
        (2, 0.002)
    """
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise ValueError("a Chrome trace must be an object with a 'traceEvents' list")
    events: list[Event] = []
    tracks: set[int] = set()
    name = ""
    for e in data["traceEvents"]:
        if not isinstance(e, dict):
            continue
        if e.get("ph") == "M":
            if e.get("name") == "thread_name":
                tracks.add(int(e.get("tid", 0)))
            elif e.get("name") == "process_name":
                name = str((e.get("args") or {}).get("name", ""))
            continue
        if e.get("ph") != "X":
            continue
        try:
            action = Action.parse(str(e["name"]))
        except (KeyError, ValueError):
            continue
        start = float(e.get("ts", 0.0)) * 1e-6
        events.append(Event(int(e.get("tid", 0)), action, start, start + float(e.get("dur", 0.0)) * 1e-6))
    n = max(len(tracks), max((ev.rank for ev in events), default=-1) + 1)
    units = bool((data.get("otherData") or {}).get("unit_costs", False))
    return Timeline(events, n, "" if name == "pipeline" else name, units)


def load_timeline(path: str | Path) -> Timeline:
    """Read a timeline JSON (``Timeline.to_json``, ``simulate --save-timeline``) or a Chrome trace.

        >>> import tempfile
        >>> t = Timeline([Event(0, Action.parse("0F0"), 0.0, 0.5), Event(1, Action.parse("1F0"), 0.5, 1.5)], 2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     t.to_json(Path(d) / "run.json")
        ...     load_timeline(Path(d) / "run.json").step_time
        1.5
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    try:
        if isinstance(data, dict) and "traceEvents" in data:
            return from_chrome_trace(data)
        return Timeline.from_dict(data)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: neither a timeline JSON nor a Chrome trace: {e}") from e


def _durations(tl: Timeline) -> dict[tuple[int, Kind], list[float]]:
    out: dict[tuple[int, Kind], list[float]] = {}
    for e in tl.events:
        if e.action.kind.is_compute:
            out.setdefault((e.action.stage, e.action.kind), []).append(e.duration)
    return out


def kind_table(predicted: Timeline, measured: Timeline) -> str:
    """Median duration of each (stage, compute kind), predicted vs measured, with the relative error.

        >>> a = Timeline([Event(0, Action.parse("0F0"), 0.0, 1.0)], 1)
        >>> print(kind_table(a, a).splitlines()[2])
        stage 0 F       1s            1s            +0.0%
    """
    pd, md = _durations(predicted), _durations(measured)
    head = f"{'action':<15} {'predicted':<13} {'measured':<13} error"
    lines = [head, "-" * len(head)]
    for key in sorted(set(pd) | set(md), key=lambda k: (k[0], list(Kind).index(k[1]))):
        p = statistics.median(pd[key]) if key in pd else 0.0
        m = statistics.median(md[key]) if key in md else 0.0
        err = f"{100.0 * (p - m) / m:+.1f}%" if m > 0 and predicted.unit_costs == measured.unit_costs else "n/a"
        lines.append(f"{f'stage {key[0]} {key[1].value}':<15} {format_time(p, predicted.unit_costs):<13} "
                     f"{format_time(m, measured.unit_costs):<13} {err}")
    return "\n".join(lines)


def predict_vs_measure(schedule: Schedule, costs: CostModel, measured: Timeline, *, per_action: bool = True) -> str:
    """Simulate ``schedule`` under ``costs`` and compare it with a measured timeline of the same schedule.

    ``costs`` are per micro-batch of this schedule (see ``CostModel.for_microbatches``); they are
    re-cut to the schedule's stage count when that differs (``CostModel.rebin``). The answer is ``compare_table`` (step time and bubble per rank, predicted vs
    measured, error %) and, with ``per_action``, the median time of each stage's F/B/I/W.

        >>> from pippy.schedules.generators import one_f_one_b
        >>> s = one_f_one_b(2, 2)
        >>> c = CostModel.uniform(2)
        >>> from pippy.sim.simulate import simulate
        >>> print(predict_vs_measure(s, c, simulate(s, c).timeline, per_action=False).splitlines()[2])
        step time       9s            9s            +0.0%
    """
    from pippy.sim.simulate import simulate

    if costs.num_stages != schedule.num_stages:
        costs = costs.rebin(schedule.num_stages)
    predicted = simulate(schedule, costs).timeline
    text = compare_table(predicted, measured)
    if per_action:
        text += "\n\n" + kind_table(predicted, measured)
    return text

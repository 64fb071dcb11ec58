"""Renderers for a Timeline (simulated or measured): terminal text, PNG, Chrome/Perfetto trace, compare table.

    >>> from pippy.schedules.ir import Action
    >>> from pippy.sim.timeline import Event
    >>> t = Timeline([Event(0, Action.parse("0F0"), 0.0, 1.0), Event(1, Action.parse("1F0"), 1.0, 2.0)], 2)
    >>> print(render_text(t, width=8, color=False))
    rank 0 |F0  ....|
    rank 1 |....F0  |
            0     2s
    legend: F forward, B backward, I input-grad, W weight-grad, . idle; lower case = a later stage on the rank
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from pippy.schedules.ir import Kind
from pippy.sim.timeline import Event, Timeline

__all__ = ["compare_table", "format_bytes", "format_time", "path_problem", "render_png", "render_text", "to_chrome_trace", "write_chrome_trace"]

_ANSI = {Kind.F: "\x1b[30;46m", Kind.B: "\x1b[30;45m", Kind.I: "\x1b[30;43m", Kind.W: "\x1b[30;42m"}
_RESET = "\x1b[0m"
_MPL_COLORS = {Kind.F: "#4db6d0", Kind.B: "#c77dcf", Kind.I: "#e8c547", Kind.W: "#6abf69"}
_KIND_NAMES = {Kind.F: "F forward", Kind.B: "B backward", Kind.I: "I input-grad", Kind.W: "W weight-grad"}
_LEGEND = "legend: F forward, B backward, I input-grad, W weight-grad, . idle; lower case = a later stage on the rank"


def format_time(seconds: float, units: bool = False) -> str:
    """Short human form of a duration: ``1.5s``, ``12.3ms``, ``40us``; with ``units``, cost units (unit costs).

        >>> format_time(0.0123), format_time(33.0), format_time(33.0, units=True), format_time(1.0, True)
        ('12.3ms', '33s', '33 units', '1 unit')
    """
    if units:
        return f"{seconds:.4g} unit" + ("" if seconds == 1 else "s")
    a = abs(seconds)
    if a >= 1 or a == 0:
        return f"{seconds:.4g}s"
    if a >= 1e-3:
        return f"{seconds * 1e3:.3g}ms"
    return f"{seconds * 1e6:.3g}us"


def format_bytes(n: float) -> str:
    """Short human form of a size in binary units: ``1.5GiB``; plain numbers below 1 KiB.

        >>> format_bytes(3 * 2**30), format_bytes(8)
        ('3GiB', '8')
    """
    for unit, k in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= k:
            return f"{n / k:.4g}{unit}"
    return f"{n:.4g}"


def path_problem(path: str | Path) -> str | None:
    """Why a file cannot be written at ``path`` (its folder is missing or read-only, or it is a folder), or None.

        >>> path_problem("/nonexistent-dir/t.json")
        'its folder /nonexistent-dir does not exist'
        >>> import tempfile; path_problem(tempfile.gettempdir() + "/t.json") is None
        True
    """
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        return "it is a folder; give a file name"
    if not folder.is_dir():
        return f"its folder {folder} does not exist"
    if not os.access(folder, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        return f"{p if p.exists() else folder} is not writable"
    return None


def _first_stage(tl: Timeline) -> dict[int, int]:
    first: dict[int, int] = {}
    for e in tl.events:
        if e.rank not in first or e.action.stage < first[e.rank]:
            first[e.rank] = e.action.stage
    return first


def render_text(tl: Timeline, *, width: int | None = None, color: bool = True, max_width: int | None = None) -> str:
    """One row per rank; compute actions as blocks labelled ``<kind><micro-batch>``, idle as dots.

    ``width`` is the number of character cells for the whole step (default: enough that the
    shortest action holds its label). A step wider than ``max_width`` (default: the terminal's
    width) is split into pages of stacked time windows, each with its own axis. A label is dropped
    to its kind letter only where a block truly has fewer cells than the label. With ``color`` the
    blocks get ANSI backgrounds; without, the output is plain text. Kind letters are upper case
    for a rank's first stage and lower case for its later stages (interleaved and V schedules).

        >>> render_text(Timeline([], 1), color=False)
        'rank 0 ||\\n(empty timeline)'
    """
    tl = tl.normalized()
    step = tl.step_time
    if step <= 0:
        return "\n".join(f"rank {r} ||" for r in range(tl.num_ranks)) + "\n(empty timeline)"
    first = _first_stage(tl)
    label_w = len(f"rank {tl.num_ranks - 1}")
    page = max(20, (max_width or shutil.get_terminal_size().columns) - label_w - 3)
    by_rank: list[list[Event]] = [[] for _ in range(tl.num_ranks)]
    for e in tl.events:
        if e.action.kind.is_compute and 0 <= e.rank < tl.num_ranks:
            by_rank[e.rank].append(e)
    if width is None:
        spans = [e for evs in by_rank for e in evs if e.duration > 0]
        need = max((len(f"{e.action.kind.value}{e.action.mb}") / e.duration for e in spans), default=1.0)
        width = min(8 * page, max(20, math.ceil(step * need - 1e-9)))
    else:
        page = max(page, width) if max_width is None else max_width
    width = max(1, width)
    scale = width / step
    rows: list[tuple[list[str], list[Kind | None]]] = []
    for r in range(tl.num_ranks):
        chars = ["."] * width
        kinds: list[Kind | None] = [None] * width
        for e in by_rank[r]:
            lo = min(width - 1, round(e.start * scale))
            hi = max(lo + 1, min(width, round(e.end * scale)))
            letter = e.action.kind.value if e.action.stage == first.get(r) else e.action.kind.value.lower()
            text = f"{letter}{e.action.mb}"
            n = hi - lo
            cells = (text + " " * n)[:n] if n >= len(text) else letter * n
            for j in range(n):
                chars[lo + j] = cells[j]
                kinds[lo + j] = e.action.kind
        rows.append((chars, kinds))
    out: list[str] = []
    for a in range(0, width, page):
        b = min(width, a + page)
        for r, (chars, kinds) in enumerate(rows):
            body = _paint(chars[a:b], kinds[a:b]) if color else "".join(chars[a:b])
            out.append(f"{f'rank {r}':<{label_w}} |{body}|")
        lo_label = "0" if a == 0 else format_time(a / scale, tl.unit_costs)
        end_label = format_time(b / scale, tl.unit_costs)
        out.append(" " * (label_w + 2) + lo_label + " " * max(1, b - a - len(lo_label) - len(end_label)) + end_label)
    return "\n".join([*out, _LEGEND])


def _paint(chars: list[str], kinds: list[Kind | None]) -> str:
    out: list[str] = []
    cur: Kind | None = None
    for ch, k in zip(chars, kinds):
        if k is not cur:
            if cur is not None:
                out.append(_RESET)
            if k is not None:
                out.append(_ANSI.get(k, ""))
            cur = k
        out.append(ch)
    if cur is not None:
        out.append(_RESET)
    return "".join(out)


def render_png(tl: Timeline, path: str | Path, *, title: str | None = None) -> None:
    """Draw the timeline as a Gantt chart PNG (needs matplotlib: ``pip install pippy[viz]``).

        >>> import tempfile
        >>> from pippy.schedules.ir import Action
        >>> from pippy.sim.timeline import Event
        >>> with tempfile.TemporaryDirectory() as d:
        ...     render_png(Timeline([Event(0, Action.parse("0F0"), 0.0, 1.0)], 1), Path(d) / "step.png")
        ...     (Path(d) / "step.png").stat().st_size > 0
        True
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("PNG output needs matplotlib: pip install pippy[viz]") from e
    tl = tl.normalized()
    step = tl.step_time or 1.0
    fig_w = min(40.0, max(8.0, 0.25 * len(tl.events) / max(1, tl.num_ranks)))
    fig, ax = plt.subplots(figsize=(fig_w, 0.5 * tl.num_ranks + 1.5))
    first = _first_stage(tl)
    bars: dict[tuple[int, Kind, bool], list[tuple[float, float]]] = {}
    compute = [ev for ev in tl.events if ev.action.kind.is_compute]
    for ev in compute:  # one bar collection per (rank, kind, stage group): fast for many events
        bars.setdefault((ev.rank, ev.action.kind, ev.action.stage != first.get(ev.rank)), []).append((ev.start, ev.duration))
    for (rank, kind, later), spans in bars.items():
        ax.broken_barh(spans, (rank - 0.4, 0.8), facecolors=_MPL_COLORS.get(kind, "grey"),
                       edgecolors="black", linewidth=0.3, alpha=0.65 if later else 1.0)
    px_per_time = fig_w * 120 * 0.8 / step  # the plot's share of the figure, at 120 dpi
    for ev in compute:  # a label wherever its bar is wide enough for it (about 5 pixels a character at size 6)
        if ev.duration * px_per_time >= 5 * len(str(ev.action.mb)) + 2:
            ax.text(ev.start + ev.duration / 2, ev.rank, str(ev.action.mb), ha="center", va="center", fontsize=6)
    ax.set_yticks(range(tl.num_ranks), [f"rank {r}" for r in range(tl.num_ranks)])
    ax.invert_yaxis()
    ax.set_xlim(0, step)
    ax.set_xlabel("time (cost units: unit costs, not seconds)" if tl.unit_costs else "time (s)")
    ax.set_title(title or tl.name or "pipeline timeline")
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=_KIND_NAMES[k]) for k, c in _MPL_COLORS.items()]
    if any(later for _, _, later in bars):
        handles.append(Patch(facecolor="grey", alpha=0.65, label="lighter: a later stage\non the rank"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def to_chrome_trace(tl: Timeline) -> dict[str, Any]:
    """Chrome/Perfetto trace: one thread track per rank, ``"X"`` events, ts/dur in microseconds.

        >>> from pippy.schedules.ir import Action
        >>> from pippy.sim.timeline import Event
        >>> d = to_chrome_trace(Timeline([Event(0, Action.parse("0F0"), 0.0, 1e-3)], 1))
        >>> [e["dur"] for e in d["traceEvents"] if e["ph"] == "X"]
        [1000.0]
    """
    o = tl.origin
    name = (tl.name or "pipeline") + (" [unit costs: 1 s shown = 1 cost unit]" if tl.unit_costs else "")
    ev: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": name}}]
    for r in range(tl.num_ranks):
        ev.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}})
        ev.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": r, "args": {"sort_index": r}})
    for e in tl.events:
        a = e.action
        ev.append({
            "name": str(a), "cat": a.kind.value, "ph": "X", "pid": 0, "tid": e.rank,
            "ts": (e.start - o) * 1e6, "dur": max(0.0, e.end - e.start) * 1e6,
            "args": {"stage": a.stage, "microbatch": a.mb, "kind": a.kind.value},
        })
    out: dict[str, Any] = {"traceEvents": ev, "displayTimeUnit": "ms"}
    if tl.unit_costs:
        out["otherData"] = {"unit_costs": True, "time_unit": "cost units shown as seconds (unit costs, not measured)"}
    return out


def write_chrome_trace(tl: Timeline, path: str | Path) -> None:
    """Write ``to_chrome_trace(tl)`` to ``path`` (open in ui.perfetto.dev or chrome://tracing)."""
    Path(path).write_text(json.dumps(to_chrome_trace(tl)) + "\n")


def _err(pred: float, meas: float, same_units: bool = True) -> str:
    if not same_units:
        return "n/a (units differ)"
    if meas == 0:
        return "n/a" if pred != 0 else "0.0%"
    return f"{100.0 * (pred - meas) / meas:+.1f}%"


def compare_table(predicted: Timeline, measured: Timeline) -> str:
    """Step time and per-rank bubble, predicted vs measured, with the relative error.

        >>> from pippy.schedules.ir import Action
        >>> from pippy.sim.timeline import Event
        >>> a = Timeline([Event(0, Action.parse("0F0"), 0.0, 1.0)], 1)
        >>> print(compare_table(a, a).splitlines()[2])
        step time       1s            1s            +0.0%
    """
    n = max(predicted.num_ranks, measured.num_ranks)
    head = f"{'metric':<15} {'predicted':<13} {'measured':<13} error"
    lines = [head, "-" * len(head)]
    ps, ms = predicted.step_time, measured.step_time
    same = predicted.unit_costs == measured.unit_costs
    lines.append(f"{'step time':<15} {format_time(ps, predicted.unit_costs):<13} "
                 f"{format_time(ms, measured.unit_costs):<13} {_err(ps, ms, same)}")
    pb = predicted.bubbles() + [0.0] * (n - predicted.num_ranks)
    mb = measured.bubbles() + [0.0] * (n - measured.num_ranks)
    for r in range(n):
        lines.append(f"{f'bubble rank {r}':<15} {100 * pb[r]:<13.1f} {100 * mb[r]:<13.1f} {_err(pb[r], mb[r])}")
    lines.append("(bubble in % of the step; error = (predicted - measured) / measured)")
    if not same:
        which = "predicted" if predicted.unit_costs else "measured"
        lines.append(f"note: the {which} timeline has unit costs (simulated without --costs), the other is in "
                     "seconds: step times do not compare; simulate with --costs from `pippy profile`")
    return "\n".join(lines)


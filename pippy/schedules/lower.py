"""Lowering (insert SEND/RECV from ``deps`` and placement) and CSV read / write of schedules.

    >>> from pippy.schedules.generators import one_f_one_b
    >>> print(lower(one_f_one_b(2, 1)))
    1f1b: 2 ranks, 2 stages, 1 microbatches
    rank 0:      0F0 0SEND_F0 0RECV_B0      0B0
    rank 1: 1RECV_F0      1F0      1B0 1SEND_B0

CSV format (``to_csv`` writes it, ``from_csv`` reads it)::

    # pippy-schedule v1
    # name: 1f1b
    # ranks: 2
    # microbatches: 1
    # stage_to_rank: 0 1
    # deps: 1<0
    0F0,0SEND_F0,0RECV_B0,0B0
    1RECV_F0,1F0,1B0,1SEND_B0

Row ``r`` (after the ``#`` lines) is rank ``r``'s program; each cell is a compact action. The
``#`` header lines are optional: without them ``ranks`` is the number of rows, ``stage_to_rank``
is inferred from which row runs each stage, ``microbatches`` is the largest micro-batch + 1 and
``deps`` is a chain. ``deps`` lists edges ``consumer<producer`` separated by spaces. Empty cells
are ignored, so rows may be padded.

The CSVs PyTorch's pipelining package writes load too: its ``(0F1;1B0)OVERLAP_F_B`` cells run their
actions in order, and its FSDP bookkeeping cells (``0UNSHARD``, ``0RESHARD``, ``0REDUCE_GRAD``) are
dropped, since pippy gathers and reduces a stage's FSDP2 shards around its own actions.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TextIO

from pippy.schedules.ir import Action, Kind, Schedule, chain_deps, comm_around

__all__ = [
    "cell_actions",
    "defer_gradless_backward",
    "from_csv",
    "from_csv_string",
    "fuse_adjacent_iw",
    "lower",
    "runtime_form",
    "to_csv",
    "to_csv_string",
]

_MAGIC = "pippy-schedule v1"


def lower(schedule: Schedule) -> Schedule:
    """Return a copy of a compute-only ``schedule`` with the communication inserted.

    For each action on rank ``r`` of stage ``s``, micro-batch ``i``, per ``schedule.deps``
    (:func:`~pippy.schedules.ir.stage_comm` and :func:`~pippy.schedules.ir.comm_around` say
    which kinds and where, from the one dependency rule :func:`~pippy.schedules.ir.needs`):

    - ``RECV_F(s, i)`` right before ``F(s, i)`` if a producer of ``s`` is on another rank;
    - ``SEND_F(s, i)`` right after ``F(s, i)`` if a consumer of ``s`` is on another rank (one
      send carries ``s``'s outputs to every remote consumer);
    - ``RECV_B(s, i)`` right before ``B``/``I(s, i)`` if a consumer is on another rank;
    - ``SEND_B(s, i)`` right after ``B``/``I(s, i)`` if a producer is on another rank.

    Stages on the same rank exchange nothing. A schedule that already holds SEND/RECV is
    returned unchanged (as a copy), so lowering twice is a no-op; call ``.compute_only()`` first
    to re-lower one. Lowering keeps every rank's compute order, so a compute-only schedule that
    passes :func:`~pippy.schedules.validate.validate` lowers to one that passes too.

        >>> from pippy.schedules.generators import gpipe
        >>> [str(a) for a in lower(gpipe(2, 1)).actions[0]]
        ['0F0', '0SEND_F0', '0RECV_B0', '0B0']
    """
    copy = [list(acts) for acts in schedule.actions]
    if any(a.kind.is_comm for acts in copy for a in acts):
        return Schedule(schedule.name, copy, schedule.stage_to_rank, schedule.n_microbatches, dict(schedule.deps))
    n = schedule.num_stages
    around = comm_around(schedule)
    # by kind value, then stage: hashing a str is far cheaper than hashing an Enum member
    by_kind = {k.value: [around[(s, k)] for s in range(n)] for k in (Kind.F, Kind.B, Kind.I, Kind.W)}
    out: list[list[Action]] = []
    for acts in copy:
        row: list[Action] = []
        for a in acts:
            s = a.stage
            if not 0 <= s < n:  # out of range: left for the validator to report
                row.append(a)
                continue
            before, after = by_kind[a.kind._value_][s]
            if before:
                row += [Action(s, k, a.mb) for k in before]
            row.append(a)
            if after:
                row += [Action(s, k, a.mb) for k in after]
        out.append(row)
    return Schedule(schedule.name, out, schedule.stage_to_rank, schedule.n_microbatches, dict(schedule.deps))


def fuse_adjacent_iw(schedule: Schedule) -> Schedule:
    """Run ``I`` directly followed by its own ``W`` (same stage and micro-batch, same rank) as one ``B``.

    The math is the same; one autograd pass is cheaper than two, and nothing could run between
    them anyway. Works on compute-only schedules (comm actions in between prevent fusion).

        >>> from pippy.schedules.ir import Action, Kind, Schedule
        >>> s = Schedule("s", [[Action(0, Kind.F, 0), Action(0, Kind.I, 0), Action(0, Kind.W, 0)]], (0,), 1)
        >>> [str(a) for a in fuse_adjacent_iw(s).actions[0]]
        ['0F0', '0B0']
    """
    rows: list[list[Action]] = []
    for acts in schedule.actions:
        row: list[Action] = []
        k = 0
        while k < len(acts):
            a = acts[k]
            nxt = acts[k + 1] if k + 1 < len(acts) else None
            if a.kind is Kind.I and nxt is not None and nxt.kind is Kind.W and (nxt.stage, nxt.mb) == (a.stage, a.mb):
                row.append(Action(a.stage, Kind.B, a.mb))
                k += 2
            else:
                row.append(a)
                k += 1
        rows.append(row)
    return Schedule(schedule.name, rows, schedule.stage_to_rank, schedule.n_microbatches, dict(schedule.deps))


def defer_gradless_backward(schedule: Schedule, stages: Iterable[int]) -> Schedule:
    """For ``stages`` whose inputs need no gradient, drop each ``I`` and run a whole ``B`` at its ``W``.

    Such a stage's ``I`` feeds nobody (the first stage's token ids, say), so splitting its
    backward only costs a second pass; the whole backward at the ``W``'s place does the same
    math once, no later than the weight gradients were due. Other stages are untouched, and so is
    one that other stages feed (its input was detached): their backwards wait for its ``I``. Memory:
    the stage holds its whole graph until that B, where a split one could free part of it at I.

        >>> from pippy.schedules.ir import Schedule, as_actions
        >>> s = Schedule("s", [as_actions(["0F0", "0I0", "0F1", "0W0", "0I1", "0W1"])], (0,), 2)
        >>> [str(a) for a in defer_gradless_backward(s, [0]).actions[0]]
        ['0F0', '0F1', '0B0', '0B1']
    """
    # a stage fed by another stage keeps its I: its producers' backwards wait there for its (empty) input
    # gradients, and at the W's place a B would come after them (a stop-gradient mid-pipeline under ZB-V)
    which = {s for s in stages if not schedule.deps.get(s)}
    has_w = {(a.stage, a.mb) for acts in schedule.actions for a in acts if a.kind is Kind.W and a.stage in which}
    rows = [
        [Action(a.stage, Kind.B, a.mb) if a.kind is Kind.W and a.stage in which else a
         for a in acts if not (a.kind is Kind.I and (a.stage, a.mb) in has_w)]
        for acts in schedule.actions
    ]
    return Schedule(schedule.name, rows, schedule.stage_to_rank, schedule.n_microbatches, dict(schedule.deps))


def runtime_form(schedule: Schedule, gradless_stages: Iterable[int] = (0,), *, fuse: bool = True) -> Schedule:
    """The compute-only schedule the runtime executes for a generated ``schedule``.

    With ``fuse`` (the runtime's ``fuse_backward=True``, its default):
    :func:`defer_gradless_backward` for ``gradless_stages``, then :func:`fuse_adjacent_iw`.
    Without, an unchanged copy. The runtime lowers and runs this, and the simulator should be fed
    it too, so that a prediction is about what actually runs.

    ``gradless_stages`` are the stages none of whose inputs needs a gradient. The default
    ``(0,)`` fits a plain pipeline: the first stage reads only the model's inputs (token ids,
    data), which need no gradient. The runtime passes its pipe's actual set.

        >>> from pippy.schedules.generators import zb_h1
        >>> [str(a) for a in runtime_form(zb_h1(2, 2)).actions[0]]
        ['0F0', '0F1', '0B0', '0B1']
        >>> [str(a) for a in runtime_form(zb_h1(2, 2), fuse=False).actions[0]]
        ['0F0', '0F1', '0I0', '0W0', '0I1', '0W1']
    """
    if not fuse:
        return Schedule(
            schedule.name, [list(acts) for acts in schedule.actions], schedule.stage_to_rank,
            schedule.n_microbatches, dict(schedule.deps),
        )
    return fuse_adjacent_iw(defer_gradless_backward(schedule, gradless_stages))


def _format_deps(deps: Mapping[int, Sequence[int]]) -> str:
    return " ".join(f"{s}<{d}" for s in sorted(deps) for d in sorted(deps[s]))


def to_csv_string(schedule: Schedule) -> str:
    """The CSV text of ``schedule`` (format in the module docstring).

        >>> from pippy.schedules.generators import gpipe
        >>> print(to_csv_string(gpipe(1, 2)), end="")
        # pippy-schedule v1
        # name: gpipe
        # ranks: 1
        # microbatches: 2
        # stage_to_rank: 0
        # deps:
        0F0,0F1,0B1,0B0
    """
    buf = io.StringIO()
    buf.write(f"# {_MAGIC}\n# name: {schedule.name}\n# ranks: {schedule.num_ranks}\n")
    buf.write(f"# microbatches: {schedule.n_microbatches}\n")
    buf.write(f"# stage_to_rank: {' '.join(str(r) for r in schedule.stage_to_rank)}\n")
    buf.write(f"# deps: {_format_deps(schedule.deps)}".rstrip() + "\n")
    writer = csv.writer(buf, lineterminator="\n")
    for acts in schedule.actions:
        writer.writerow([str(a) for a in acts])
    return buf.getvalue()


def to_csv(schedule: Schedule, path_or_file: str | os.PathLike[str] | TextIO) -> None:
    """Write ``schedule`` as CSV to a path or an open text file.

        >>> import io
        >>> from pippy.schedules.generators import gpipe
        >>> f = io.StringIO(); to_csv(gpipe(2, 1), f); f.getvalue().splitlines()[-1]
        '1F0,1B0'
    """
    text = to_csv_string(schedule)
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    else:
        path_or_file.write(text)


def _parse_deps(text: str) -> dict[int, tuple[int, ...]]:
    deps: dict[int, list[int]] = {}
    for edge in text.split():
        dst, sep, src = edge.partition("<")
        if not sep or not dst.strip().isdigit() or not src.strip().isdigit():
            raise ValueError(f"bad deps edge {edge!r} in CSV header: expected 'consumer<producer', e.g. '2<0'")
        deps.setdefault(int(dst), []).append(int(src))
    return {s: tuple(sorted(v)) for s, v in deps.items()}


def from_csv_string(
    text: str,
    *,
    name: str | None = None,
    stage_to_rank: Sequence[int] | None = None,
    n_microbatches: int | None = None,
    deps: Mapping[int, Sequence[int]] | None = None,
) -> Schedule:
    """Parse CSV text into a Schedule; keyword arguments override the header or the inference.

        >>> s = from_csv_string("0F0,0F1,0B0,0B1\\n1F0,1B0,1F1,1B1\\n")
        >>> s.stage_to_rank, s.n_microbatches, s.name
        ((0, 1), 2, 'csv')
    """
    return _parse(text, name, "csv", stage_to_rank, n_microbatches, deps)


def _parse(
    text: str,
    name: str | None,
    default_name: str,
    stage_to_rank: Sequence[int] | None,
    n_microbatches: int | None,
    deps: Mapping[int, Sequence[int]] | None,
) -> Schedule:
    header: dict[str, str] = {}
    body: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            key, sep, value = line.lstrip()[1:].partition(":")
            if sep:
                header[key.strip().lower()] = value.strip()
        else:
            body.append(line)
    while body and not body[-1].strip().strip(","):
        body.pop()  # trailing blank lines (a rank with no actions is kept via the 'ranks' header)
    rows: list[list[Action]] = []
    for lineno, cells in enumerate(csv.reader(body), start=1):
        try:
            rows.append([a for c in cells for a in cell_actions(c)])
        except ValueError as e:
            raise ValueError(f"CSV row {lineno} (rank {lineno - 1}): {e}") from e
    n_ranks = int(header.get("ranks", len(rows)))
    if len(rows) > n_ranks:
        raise ValueError(f"CSV has {len(rows)} rows but its header says ranks: {n_ranks}; fix one of them")
    rows += [[] for _ in range(n_ranks - len(rows))]
    if stage_to_rank is None and header.get("stage_to_rank"):
        stage_to_rank = [int(x) for x in header["stage_to_rank"].split()]
    if stage_to_rank is None:
        stage_to_rank = _infer_placement(rows)
    if n_microbatches is None:
        n_microbatches = int(header["microbatches"]) if header.get("microbatches") else \
            1 + max((a.mb for r in rows for a in r), default=0)
    if deps is None:
        deps = _parse_deps(header["deps"]) if "deps" in header else chain_deps(len(stage_to_rank))
    full = {s: tuple(deps.get(s, ())) for s in range(len(stage_to_rank))}
    return Schedule(name or header.get("name") or default_name, rows, tuple(stage_to_rank), n_microbatches, full)


_FSDP_CELL = re.compile(r"^\s*\d+(UNSHARD|RESHARD|REDUCE_GRAD)\d*\s*$")


def cell_actions(text: str) -> list[Action]:
    """The actions of one CSV cell: pippy's ``1F0``, or PyTorch pipelining's overlap and FSDP cells.

        >>> cell_actions("(0F1;3B0)OVERLAP_F_B")
        [Action(stage=0, kind=<Kind.F: 'F'>, mb=1), Action(stage=3, kind=<Kind.B: 'B'>, mb=0)]
        >>> cell_actions("2UNSHARD"), cell_actions(" ")
        ([], [])
    """
    text = text.strip()
    if not text or _FSDP_CELL.match(text):
        return []
    if text.startswith("(") and text.endswith(")OVERLAP_F_B") and text.count("(") == 1 and text.count(")") == 1:
        return [a for part in text[1:text.index(")")].split(";") for a in cell_actions(part)]
    return [Action.parse(text)]


def _infer_placement(rows: list[list[Action]]) -> list[int]:
    home: dict[int, int] = {}
    for r, acts in enumerate(rows):
        for a in acts:
            if home.setdefault(a.stage, r) != r:
                raise ValueError(
                    f"stage {a.stage} has actions on ranks {home[a.stage]} and {r}; a stage lives on one rank. "
                    "Move its actions to one row, or pass stage_to_rank= explicitly"
                )
    n = 1 + max(home, default=-1)
    gaps = [s for s in range(n) if s not in home]
    if gaps:
        raise ValueError(f"stages {gaps} never appear in the CSV, so their rank is unknown; pass stage_to_rank=")
    return [home[s] for s in range(n)]


def from_csv(
    path_or_file: str | os.PathLike[str] | TextIO,
    *,
    name: str | None = None,
    stage_to_rank: Sequence[int] | None = None,
    n_microbatches: int | None = None,
    deps: Mapping[int, Sequence[int]] | None = None,
) -> Schedule:
    """Read a schedule from a CSV path or open text file (see the module docstring).

    A hand-written CSV of compute actions only loads too (placement and micro-batch count
    are inferred); pass it to :func:`lower` to add the communication.

        >>> import io
        >>> lower(from_csv(io.StringIO("0F0,0B0\\n1F0,1B0\\n"))).actions[1][0]
        Action(stage=1, kind=<Kind.RECV_F: 'RECV_F'>, mb=0)
    """
    default = "csv"
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, encoding="utf-8", newline="") as f:
            text = f.read()
        default = os.path.splitext(os.path.basename(os.fspath(path_or_file)))[0] or default
    else:
        text = path_or_file.read()
    return _parse(text, name, default, stage_to_rank, n_microbatches, deps)

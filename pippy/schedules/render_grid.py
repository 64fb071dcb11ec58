"""Text rendering of a schedule as a rank × step grid, with optional marked cells.

Used by the validator's error messages and by ``python -m pippy show``.

    >>> from pippy.schedules.generators import one_f_one_b
    >>> print(grid(one_f_one_b(2, 2), mark=(1, 1)))
    step      0     1     2     3
    rank 0  0F0   0F1   0B0   0B1
    rank 1  1F0  [1B0]  1F1   1B1
"""

from __future__ import annotations

from collections.abc import Iterable

from pippy.schedules.ir import Schedule

__all__ = ["Cell", "grid"]

Cell = tuple[int, int]
"""A grid position: ``(rank, step)``, step being the index in that rank's action list."""


def _as_cells(mark: Cell | Iterable[Cell] | None) -> set[Cell]:
    if mark is None:
        return set()
    if isinstance(mark, tuple) and len(mark) == 2 and isinstance(mark[0], int) and isinstance(mark[1], int):
        return {(mark[0], mark[1])}
    return {(int(r), int(s)) for r, s in mark}  # type: ignore[misc]


def grid(
    schedule: Schedule,
    mark: Cell | Iterable[Cell] | None = None,
    *,
    window: int | None = None,
) -> str:
    """Render ``schedule`` as a table: one row per rank, one column per step.

    ``mark`` is a ``(rank, step)`` cell or an iterable of them; marked cells are wrapped in
    ``[ ]``. A marked step past the end of a rank's list shows as ``[?]`` (a missing action).
    With ``window``, only the steps within ``window`` of a marked cell are shown (``…`` marks the
    cut; with nothing marked, the first ``2·window+1`` steps), which keeps error messages for long
    schedules readable.

        >>> from pippy.schedules.generators import gpipe
        >>> print(grid(gpipe(2, 2)))
        step     0   1   2   3
        rank 0 0F0 0F1 0B1 0B0
        rank 1 1F0 1F1 1B1 1B0
    """
    cells = _as_cells(mark)
    n_steps = max([len(r) for r in schedule.actions] + [s + 1 for _, s in cells] + [0])
    lo, hi = 0, n_steps
    if window is not None and cells:
        lo = max(0, min(s for _, s in cells) - window)
        hi = min(n_steps, max(s for _, s in cells) + window + 1)
    elif window is not None:
        hi = min(n_steps, 2 * window + 1)
    width = max([len(str(a)) for r in schedule.actions for a in r] + [len(str(n_steps - 1)), 1])
    pad = 2 if cells else 0  # room for the brackets when anything is marked

    def cell_text(rank: int, step: int) -> str:
        acts = schedule.actions[rank] if rank < len(schedule.actions) else []
        text = str(acts[step]) if step < len(acts) else ("?" if (rank, step) in cells else "")
        if (rank, step) in cells:
            return ("[" + text + "]").rjust(width + 2)
        return (" " if pad else "") + text.rjust(width) + (" " if pad else "")

    label_w = len(f"rank {max(schedule.num_ranks - 1, 0)}")
    head = ["step".ljust(label_w)]
    if lo > 0:
        head.append("…")
    head += [(str(s) + (" " if pad else "")).rjust(width + pad) for s in range(lo, hi)]
    if hi < n_steps:
        head.append("…")
    lines = [" ".join(head).rstrip()]
    for r in range(schedule.num_ranks):
        row = [f"rank {r}".ljust(label_w)]
        if lo > 0:
            row.append("…")
        row += [cell_text(r, s) for s in range(lo, hi)]
        if hi < n_steps and hi < len(schedule.actions[r]):
            row.append("…")
        lines.append(" ".join(row).rstrip())
    return "\n".join(lines)

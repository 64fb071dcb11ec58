"""Failures that reach every rank: a notice board on the process group's store, and a start-of-run agreement check.

A pipeline rank that fails (an exception in its stage, a bad message, a timeout) posts one line
on the board: who failed, where, and why. Every other rank checks the board while it waits for a
message, so it stops within a fraction of a second with an error naming the failed rank, instead
of waiting out its own timeout. Before a schedule's first step, the ranks also publish what they
are about to run (schedule, micro-batches, placement, the traced stage edges) and compare: ranks
that disagree fail with the difference spelled out, not later with a hang: the later of two
ranks to arrive sees the difference and fails, and its failure notice stops the earlier one.

The board lives in the store the process group was created with (torchrun's TCPStore, a
FileStore, ...); each schedule instance gets its own keys, so a new schedule after a failure
starts clean.

    >>> import torch.distributed as dist
    >>> store = dist.HashStore()
    >>> board = FailureBoard(store, "pippy/demo", rank=1)
    >>> board.failure() is None
    True
    >>> board.post("stage 1 raised ValueError at 1F2")
    >>> FailureBoard(store, "pippy/demo", rank=0).failure()
    'stage 1 raised ValueError at 1F2'
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["NOTICE_LIMIT", "FailureBoard", "agree", "notice_text"]

NOTICE_LIMIT = 1500  # characters of a failure notice the other ranks get (the failing rank raises the full text)


class FailureBoard:
    """The failure notice of one schedule instance, in a torch.distributed store (see the module).

    ``post`` keeps the first notice (later ones, from ranks that only learned of it, are
    dropped); ``failure`` is a cheap non-blocking check that waiting ranks call between polls.
    """

    def __init__(self, store: Any, prefix: str, rank: int) -> None:
        self.store = store
        self.key = f"{prefix}/failed"
        self.rank = rank
        self._seen: str | None = None

    def post(self, notice: str) -> None:
        """Post ``notice`` unless another rank posted first."""
        try:
            self.store.compare_set(self.key, "", notice)
        except Exception:  # a dead store (the group is gone): nothing left to tell
            pass

    def failure(self) -> str | None:
        """The posted notice, or None while no rank failed."""
        if self._seen is None:
            try:
                if self.store.check([self.key]):
                    self._seen = self.store.get(self.key).decode()
            except Exception:  # a dead store means the job is ending: the wait itself will say so
                return None
        return self._seen


def notice_text(text: str, rank: int | None = None, limit: int = NOTICE_LIMIT) -> str:
    r"""``text`` as one line for the other ranks: its first paragraph, lines joined, cut at a word with "…".

    A line ending in ``:`` or ``.`` is followed by a space, others by ``"; "``, so that the per-rank
    lines of a disagreement stay readable. A cut text says where the whole one is: rank ``rank``'s error.
    (A text from another rank, ``rank=None``: just "…").

        >>> notice_text("ranks disagree on schedule:\n  rank 0: \"1f1b\"\n  rank 1: \"gpipe\"\nExpected ...", 1)
        'ranks disagree on schedule: rank 0: "1f1b"; rank 1: "gpipe"; Expected ...'
        >>> print(notice_text("How to fix: make step(target=...) match the output", 0, limit=30))
        How to fix: make … (cut; the whole message is in rank 0's own error)
    """
    para = text.strip().split("\n\n", 1)[0]
    out = ""
    for line in (ln.strip() for ln in para.splitlines() if ln.strip()):
        out += ("" if not out else " " if out.endswith((":", ".", ";", ",")) else "; ") + line
    if len(out) <= limit and para == text.strip():
        return out
    if len(out) > limit:
        cut = out[:limit + 1].rsplit(" ", 1)[0] if " " in out[:limit + 1] else out[:limit]
        out = cut.rstrip(" ;,:")
    return f"{out} …" if rank is None else f"{out} … (cut; the whole message is in rank {rank}'s own error)"


def _describe_difference(mine: Mapping[str, Any], theirs: Mapping[int, Mapping[str, Any]], rank: int) -> str | None:
    for key in mine:
        values = {r: v.get(key) for r, v in theirs.items()}
        if any(v != mine[key] for v in values.values()):
            every = {rank: mine[key], **values}
            lines = [f"  rank {r}: {json.dumps(v)}" for r, v in sorted(every.items())]
            return f"ranks disagree on {key}{_first_item(every)}:\n" + "\n".join(lines)
    return None


def _first_item(values: Mapping[int, Any]) -> str:
    """Where lists of the same length first differ (``", first at stage 1"`` for ``"stage 1: ..."`` items).

        >>> _first_item({0: ["stage 0: a", "stage 1: b"], 1: ["stage 0: a", "stage 1: c"]})
        ', first at stage 1'
        >>> _first_item({0: [1, 2], 1: [1, 3]}), _first_item({0: "x", 1: "y"})
        (', first at item 1', '')
    """
    lists = list(values.values())
    if not all(isinstance(v, list) for v in lists) or len({len(v) for v in lists}) != 1:
        return ""
    for i, items in enumerate(zip(*lists)):
        if any(x != items[0] for x in items):
            head = str(items[0]).split(":", 1)[0]
            return f", first at {head}" if head.startswith("stage ") else f", first at item {i}"
    return ""


def agree(store: Any, prefix: str, rank: int, ranks: Sequence[int], facts: Mapping[str, Any], where: str) -> None:
    """Publish ``facts`` (JSON-able) for ``rank`` and compare them with those of the ranks already published.

    Never waits: a rank that has not arrived yet compares when it does (and a rank still to
    call ``step`` at all is caught by the bounded waits of the step). Raises ``RuntimeError``
    naming the first fact the ranks disagree on, with every rank's value.

        >>> import torch.distributed as dist
        >>> store = dist.HashStore()
        >>> agree(store, "p", 0, [0, 1], {"schedule": "1f1b", "n_microbatches": 4}, "rank 0")
        >>> agree(store, "p", 1, [0, 1], {"schedule": "gpipe", "n_microbatches": 4}, "rank 1")
        Traceback (most recent call last):
        ...
        RuntimeError: rank 1: the pipeline ranks do not run the same thing; ranks disagree on schedule:
          rank 0: "1f1b"
          rank 1: "gpipe"
        Expected every rank to build the pipe ...
    """
    store.set(f"{prefix}/facts/{rank}", json.dumps(dict(facts)))
    keys = {r: f"{prefix}/facts/{r}" for r in ranks if r != rank}
    theirs = {r: json.loads(store.get(k).decode()) for r, k in keys.items() if store.check([k])}
    diff = _describe_difference(dict(facts), theirs, rank)
    if diff is not None:
        raise RuntimeError(
            f"{where}: the pipeline ranks do not run the same thing; {diff}\nExpected every rank to build the pipe "
            "with the same model, split and micro-batch count, and to use the same schedule class; make them agree "
            "(same split_spec / split_policy, n_microbatches and schedule on every rank)."
        )

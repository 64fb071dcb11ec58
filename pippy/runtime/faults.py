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

__all__ = ["FailureBoard", "agree"]


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


def _describe_difference(mine: Mapping[str, Any], theirs: Mapping[int, Mapping[str, Any]], rank: int) -> str | None:
    for key in mine:
        values = {r: v.get(key) for r, v in theirs.items()}
        if any(v != mine[key] for v in values.values()):
            lines = [f"  rank {r}: {json.dumps(v)}" for r, v in sorted({rank: mine[key], **values}.items())]
            return f"ranks disagree on {key}:\n" + "\n".join(lines)
    return None


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

"""Torch-format checkpoints by training step: a save cut off after some of its stages is never loaded mixed.

In ``format="torch"`` each rank writes its own stages' files, with no collective between them, so
a crash in the middle of a save (one rank done, another dead before its turn) leaves stage 0 one
save ahead of stage 1. Loading that silently would resume from weights of two different steps.

So each torch-format save of a stage is labelled with the training steps the stage has run
(``Stage.steps_trained``, the same on every rank of a pipeline, which steps in lock-step) and
written under its own names (``stage_<i>.step<k>.pt``, ``optim_<i>.step<k>.pt``, each to a
temporary file first, then renamed). The stage's record names the files of that save and of the
save before, which stay on disk; older ones are removed. :func:`newest_complete` then picks, for
``load`` and ``merge``, the newest step that every stage holds: after a cut-off save that is the
save before it (with a warning naming the stages that were ahead), never a mix. ``load`` sets
``steps_trained`` of the stages it loads to that step, so a resumed run knows where it is.

    >>> import os, tempfile, torch
    >>> from pippy import SplitPoint, checkpoint, pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> stages = [pipeline(net, 1, (torch.ones(1, 2),), split_spec={"0": SplitPoint.END}).build_stage(i, "cpu")
    ...           for i in range(2)]
    >>> with tempfile.TemporaryDirectory() as ckpt:
    ...     for step in (10, 20, 30):
    ...         for st in stages:
    ...             st.steps_trained = step  # as training steps would count
    ...         checkpoint.save(stages, ckpt)
    ...     sorted(f for f in os.listdir(ckpt) if f.startswith("stage_0"))
    ['stage_0.json', 'stage_0.step20.pt', 'stage_0.step30.pt']
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import warnings
from typing import Any

import torch

from pippy.checkpoint_files import StageRecord, read_record

__all__ = ["atomic_save", "file_names", "newest_complete", "previous_files", "prune_older", "run_of"]


def file_names(index: int, step: int, with_optim: bool) -> tuple[str, str | None]:
    """The tensors' and the optimizer state's file names of stage ``index``'s save at training step ``step``.

        >>> file_names(3, 700, True)
        ('stage_3.step700.pt', 'optim_3.step700.pt')
    """
    return f"stage_{index}.step{step}.pt", f"optim_{index}.step{step}.pt" if with_optim else None


def run_of(stage: Any) -> str:
    """The training run a save of ``stage`` belongs to: the one its last ``load`` resumed, else this launch's.

    A launch's run is torchrun's ``TORCHELASTIC_RUN_ID`` (the same on every rank and across its
    restarts); without torchrun it is unknown (""), and saves of different runs are not told apart.

        >>> run_of(object()) == os.environ.get("TORCHELASTIC_RUN_ID", "")
        True
    """
    return getattr(stage, "checkpoint_run", None) or os.environ.get("TORCHELASTIC_RUN_ID", "")


def previous_files(path: str | os.PathLike[str], index: int, num_stages: int, step: int,
                   run: str = "") -> tuple[str, str | None, int] | None:
    """What a save of stage ``index`` at ``step`` keeps as the save before: the files and step its record names.

    Only an earlier step of the same run counts: a save again at the record's step (twice in one
    step, a data-parallel replica, one replacing a cut-off save) keeps that record's own save before;
    a record of another run, or of a later step (a fresh run reusing the directory), is not kept.
    """
    try:
        rec = read_record(path, index)
    except (OSError, ValueError, KeyError):
        return None
    if rec.format != "torch" or rec.num_stages != num_stages or (rec.run and run and rec.run != run):
        return None
    if rec.step == step:
        return rec.previous if rec.previous is not None and rec.previous[2] < step else None
    return (rec.tensors, rec.optim, rec.step) if rec.step < step else None


def atomic_save(obj: Any, fname: str) -> None:
    """``torch.save`` to a temporary file beside ``fname``, then rename: a reader sees the old file or the whole new one.

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     atomic_save({"w": torch.ones(1)}, os.path.join(d, "a.pt"))
        ...     os.listdir(d), torch.load(os.path.join(d, "a.pt"))["w"]
        (['a.pt'], tensor([1.]))
    """
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(fname) or ".", prefix=f".{os.path.basename(fname)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, fname)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise


def prune_older(path: str | os.PathLike[str], index: int, keep: set[str]) -> None:
    """Remove stage ``index``'s per-step files under ``path`` that are not in ``keep`` (never other files).

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     for f in ("stage_0.step1.pt", "stage_0.step2.pt", "optim_0.step1.pt", "stage_0.pt", "stage_10.step1.pt"):
        ...         open(os.path.join(d, f), "w").close()
        ...     prune_older(d, 0, {"stage_0.step2.pt"})
        ...     sorted(os.listdir(d))
        ['stage_0.pt', 'stage_0.step2.pt', 'stage_10.step1.pt']
    """
    pattern = re.compile(rf"(stage|optim)_{index}\.step\d+\.pt")
    for entry in os.listdir(path):
        if pattern.fullmatch(entry) and entry not in keep:
            try:
                os.remove(os.path.join(path, entry))
            except FileNotFoundError:  # a data-parallel replica of the stage removed it first
                pass


def newest_complete(records: list[StageRecord], path: str | os.PathLike[str], what: str) -> list[StageRecord]:
    """``records`` as of the newest training step every one of them holds (warns when a newer save was cut off).

    DCP records are returned as they are (a DCP save is collective: all its stages or none).

        >>> a = StageRecord(index=0, num_stages=2, format="torch", keys=[], aliases=[], tensors="stage_0.step4.pt",
        ...                 optim=None, step=4, previous=("stage_0.step3.pt", None, 3))
        >>> b = dataclasses.replace(a, index=1, tensors="stage_1.step3.pt", step=3, previous=None)
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     [r.tensors for r in newest_complete([a, b], "ckpt", "checkpoint.load")]
        ['stage_0.step3.pt', 'stage_1.step3.pt']
        >>> print(seen[0].message)  # doctest: +ELLIPSIS
        checkpoint.load: checkpoint 'ckpt' holds a save that was cut off: stage 0 was saved at training step 4 but ...
    """
    torch_recs = [r for r in records if r.format == "torch"]
    runs = sorted({r.run for r in torch_recs if r.run})
    if len(runs) > 1:
        which = ", ".join(f"stage {r.index}: {r.run!r}" for r in torch_recs)
        raise ValueError(
            f"{what}: checkpoint {os.fspath(path)!r} mixes saves of different training runs ({which}): a run saved "
            "into a directory an earlier run had used, and its save did not reach every stage. Expected every stage "
            "saved by one run. Load an older copy of the directory, or give each run its own directory"
        )
    steps = {r.index: r.step for r in torch_recs}
    if len(set(steps.values())) <= 1:
        return records
    held = [{r.step} | ({r.previous[2]} if r.previous is not None and r.previous[2] < r.step else set())
            for r in torch_recs]
    common = set.intersection(*held)
    at = ", ".join(f"stage {i}: {s}" for i, s in sorted(steps.items()))
    if not common:
        raise ValueError(
            f"{what}: checkpoint {os.fspath(path)!r} mixes saves of different training steps ({at}; each stage also "
            "keeps its save before), and no step is held by every stage. Expected every rank to save its stages "
            "at the same steps into this directory. Load an older copy of the directory, or save every stage again"
        )
    target = max(common)
    out = [r if r.format != "torch" or r.step == target else
           dataclasses.replace(r, step=target, tensors=r.previous[0], optim=r.previous[1], previous=None)  # type: ignore[index]
           for r in records]
    ahead = sorted(i for i, s in steps.items() if s != target)
    behind = min(steps, key=lambda i: steps[i])
    warnings.warn(
        f"{what}: checkpoint {os.fspath(path)!r} holds a save that was cut off: stage {ahead[0]} was saved at "
        f"training step {steps[ahead[0]]} but stage {behind} last at {steps[behind]} ({at}), so that save did not "
        f"finish on every rank. Loading step {target}, the newest every stage holds (stages {ahead} from the files "
        "kept of their save before); the stages' steps_trained says so",
        stacklevel=3,
    )
    return out

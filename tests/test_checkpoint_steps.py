"""Torch-format saves by training step: a save cut off after some stages is never loaded mixed with the save before."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pippy import Schedule1F1B, SplitPoint, checkpoint, pipeline
from pippy.checkpoint_files import read_records
from pippy.runtime.local import LocalPipeline


def _stages() -> list:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    pipe = pipeline(net, 2, (torch.randn(4, 4),), split_spec={"0": SplitPoint.END})
    return [pipe.build_stage(i, "cpu") for i in range(2)]


def _train(stages: list, opt: _Opts) -> dict[str, torch.Tensor]:
    """One optimizer step on made-up gradients, counted as a schedule's step counts it; the weights after it."""
    opt.zero_grad()
    for st in stages:
        for p in st.parameters():
            p.grad = torch.ones_like(p)
        st.steps_trained += 1
    opt.step()
    return {k: v.clone() for st in stages for k, v in st.state_dict().items()}


def _weights(stages: list) -> dict[str, torch.Tensor]:
    return {k: v for st in stages for k, v in st.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@contextlib.contextmanager
def _no_warning() -> Iterator[None]:
    """Fail on any warning inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


class _Opts:
    """One SGD with momentum per stage (as one per rank): stages can then be saved one at a time."""

    def __init__(self, stages: list) -> None:
        self.per_stage = {st.index: torch.optim.SGD(st.parameters(), lr=0.1, momentum=0.9) for st in stages}

    def zero_grad(self) -> None:
        for o in self.per_stage.values():
            o.zero_grad()

    def step(self) -> None:
        for o in self.per_stage.values():
            o.step()


def _opt(stages: list) -> _Opts:
    return _Opts(stages)


def _save(stages: list, path: Path, opt: _Opts) -> None:
    for st in stages:
        checkpoint.save([st], path, optimizer=opt.per_stage[st.index])


def _load(stages: list, path: Path, opt: _Opts | None = None) -> None:
    for st in stages:
        checkpoint.load([st], path, optimizer=None if opt is None else opt.per_stage[st.index])


def test_a_save_cut_off_after_some_stages_loads_the_save_before(tmp_path: Path) -> None:
    stages = _stages()
    opt = _opt(stages)
    kept = _train(stages, opt)
    _save(stages, tmp_path, opt)
    momentum = {id(p): opt.per_stage[st.index].state[p]["momentum_buffer"].clone() for st in stages for p in st.parameters()}
    _train(stages, opt)
    _save(stages[:1], tmp_path, opt)  # the rank holding stage 1 died before its save
    assert [r.step for r in read_records(tmp_path)] == [2, 1]

    fresh = _stages()
    fresh_opt = _opt(fresh)
    _train(fresh, fresh_opt)  # some optimizer state to be replaced
    with pytest.warns(UserWarning, match=r"checkpoint.load: checkpoint .* holds a save that was cut off: stage 0 was "
                                         r"saved at training step 2 but stage 1 last at 1 .*Loading step 1"):
        _load(fresh, tmp_path, fresh_opt)
    assert _equal(_weights(fresh), kept)  # both stages at the same step: no mix
    assert [st.steps_trained for st in fresh] == [1, 1]
    for a, b in zip(stages, fresh):
        for old, new in zip(a.parameters(), b.parameters()):
            assert torch.equal(fresh_opt.per_stage[b.index].state[new]["momentum_buffer"], momentum[id(old)])
    with pytest.warns(UserWarning, match="checkpoint.merge: .* cut off"):
        assert _equal(checkpoint.merge(tmp_path), kept)

    # the resumed run saves again: that save replaces the cut-off one and nothing is mixed any more
    after = _train(fresh, fresh_opt)
    _save(fresh, tmp_path, fresh_opt)
    assert [r.step for r in read_records(tmp_path)] == [2, 2]
    again = _stages()
    with _no_warning():
        checkpoint.load(again, tmp_path)
    assert _equal(_weights(again), after)


def test_a_run_that_goes_on_after_a_cut_off_save_is_whole_again_at_its_next_save(tmp_path: Path) -> None:
    stages = _stages()
    opt = _opt(stages)
    _train(stages, opt)
    _save(stages, tmp_path, opt)
    _train(stages, opt)
    _save(stages[:1], tmp_path, opt)  # stage 1's save failed; the run caught it and went on
    latest = _train(stages, opt)
    _save(stages, tmp_path, opt)
    assert [(r.step, r.previous[2]) for r in read_records(tmp_path)] == [(3, 2), (3, 1)]  # type: ignore[index]
    fresh = _stages()
    with _no_warning():
        checkpoint.load(fresh, tmp_path)
    assert _equal(_weights(fresh), latest)


def test_the_save_before_is_kept_and_older_ones_removed(tmp_path: Path) -> None:
    stages = _stages()
    opt = _opt(stages)
    for _ in range(4):
        _train(stages, opt)
        _save(stages, tmp_path, opt)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt")) == [
        "optim_0.step3.pt", "optim_0.step4.pt", "optim_1.step3.pt", "optim_1.step4.pt",
        "stage_0.step3.pt", "stage_0.step4.pt", "stage_1.step3.pt", "stage_1.step4.pt"]
    rec = read_records(tmp_path)[1]
    assert (rec.tensors, rec.optim, rec.step, rec.previous) == ("stage_1.step4.pt", "optim_1.step4.pt", 4,
                                                                 ("stage_1.step3.pt", "optim_1.step3.pt", 3))


def test_stages_too_far_apart_are_refused_naming_their_steps(tmp_path: Path) -> None:
    stages = _stages()
    opt = _opt(stages)
    for _ in range(2):
        _train(stages, opt)
        _save(stages, tmp_path, opt)
    for _ in range(2):  # stage 1's saves failed twice; stage 0 no longer keeps step 2
        _train(stages, opt)
        _save(stages[:1], tmp_path, opt)
    with pytest.raises(ValueError, match=r"mixes saves of different training steps \(stage 0: 4, stage 1: 2; each "
                                         r"stage also keeps its save before\), and no step is held by every stage"):
        checkpoint.load(stages, tmp_path)


def test_a_schedule_counts_training_steps_not_eval_and_load_restores_the_count(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    pipe = pipeline(net, 4, (x,), split_spec={"1": SplitPoint.END})
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=torch.nn.MSELoss())
    for _ in range(3):
        lp.step(x, target=y)
    lp.eval(x)
    with pytest.raises(TypeError, match="must be a list"):
        lp.step(x, target=y, losses=5)  # type: ignore[arg-type]
    assert [st.steps_trained for st in lp.stages] == [3, 3]  # a refused step counts on no rank
    checkpoint.save(lp.stages, tmp_path)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt")) == ["stage_0.step3.pt", "stage_1.step3.pt"]
    fresh = [pipe.build_stage(i, "cpu") for i in range(2)]
    checkpoint.load(fresh, tmp_path)
    assert [st.steps_trained for st in fresh] == [3, 3]


def test_records_of_older_versions_without_steps_still_load(tmp_path: Path) -> None:
    stages = _stages()
    want = {k: v.clone() for k, v in _weights(stages).items()}
    for st in stages:
        torch.save(st.state_dict(), tmp_path / f"stage_{st.index}.pt")
        (tmp_path / f"stage_{st.index}.json").write_text(json.dumps(
            {"stage": st.index, "num_stages": 2, "format": "torch", "keys": sorted(st.state_dict()), "aliases": []}))
    fresh = _stages()
    with torch.no_grad():
        for st in fresh:
            for p in st.parameters():
                p.zero_()
    checkpoint.load(fresh, tmp_path)
    assert _equal(_weights(fresh), want)
    for st in fresh:
        st.steps_trained = 5
    checkpoint.save(fresh, tmp_path)  # the old files are the save before (step 0), kept
    assert [(r.step, r.previous) for r in read_records(tmp_path)] == [(5, ("stage_0.pt", None, 0)),
                                                                       (5, ("stage_1.pt", None, 0))]


def test_an_optimizer_of_more_stages_than_passed_is_refused_by_name(tmp_path: Path) -> None:
    stages = _stages()
    opt = torch.optim.SGD([p for st in stages for p in st.parameters()], lr=0.1)
    with pytest.raises(ValueError, match=r"the optimizer also optimizes 2 parameter\(s\) that none of the stages "
                                         r"passed \(\[0\]\) holds .*Pass every stage it optimizes in one call"):
        checkpoint.save(stages[:1], tmp_path, optimizer=opt)
    assert not os.listdir(tmp_path)  # nothing written
    checkpoint.save(stages, tmp_path, optimizer=opt)
    with pytest.raises(ValueError, match=r"parameters of no stage given to load\(\); pass every stage it optimizes"):
        checkpoint.load(stages[1:], tmp_path, optimizer=opt)


def _set_steps(stages: list, step: int) -> None:
    for st in stages:
        st.steps_trained = step


def test_a_fresh_run_reusing_the_directory_never_pairs_with_the_old_runs_files(tmp_path: Path) -> None:
    """Steps go back (a new run from step 0): the old run's later save is not kept as the new one's save before."""
    old = _stages()
    for step in (100, 200):
        _set_steps(old, step)
        checkpoint.save(old, tmp_path)
    new = _stages()
    with torch.no_grad():
        for p in new[0].parameters():
            p.add_(1.0)
    want = {k: v.clone() for k, v in _weights(new).items()}
    _set_steps(new, 100)
    checkpoint.save(new, tmp_path)
    assert [r.previous for r in read_records(tmp_path)] == [None, None]  # old step 200 is not "the save before"
    _set_steps(new, 200)
    checkpoint.save(new[:1], tmp_path)  # cut off: only stage 0 saved step 200
    fresh = _stages()
    with pytest.warns(UserWarning, match="Loading step 100"):
        checkpoint.load(fresh, tmp_path)
    assert _equal(_weights(fresh), want)  # the new run's step 100 on both stages, none of the old run's files


def test_saves_of_two_torchrun_launches_are_told_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-a")
    first = _stages()
    _set_steps(first, 100)
    checkpoint.save(first, tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-b")  # another job, not resuming: its save is cut off
    second = _stages()
    _set_steps(second, 100)
    checkpoint.save(second[:1], tmp_path)
    with pytest.raises(ValueError, match=r"mixes saves of different training runs \(stage 0: 'run-b', stage 1: "
                                         r"'run-a'\)"):
        checkpoint.load(_stages(), tmp_path)
    checkpoint.save(second, tmp_path)  # the whole save: one run again
    resumed = _stages()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-c")  # a third launch that resumes: it carries run-b on
    checkpoint.load(resumed, tmp_path)
    assert [st.checkpoint_run for st in resumed] == ["run-b", "run-b"]
    _set_steps(resumed, 101)
    checkpoint.save(resumed, tmp_path)
    assert [(r.run, r.previous[2]) for r in read_records(tmp_path)] == [("run-b", 100)] * 2  # type: ignore[index]

"""Resuming from pippy checkpoints in another placement or split: each rank's optimizer keeps its groups' hyperparameters.

One process plays both ranks: each "rank" saves and loads its own stages with its own optimizer (one
param group per layer, learning rate 0.01 * (layer + 1)). A resumed run must equal the uninterrupted
one bit for bit (float64); pippy gives the same numbers for any split and schedule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import SharedEnds, mse, train_steps
from torch import nn

import pippy
from pippy import SplitPoint, checkpoint, pipeline
from pippy.runtime.local import LocalPipeline

X = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
Y = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
LR = {str(i): 0.01 * (i + 1) for i in range(4)}
SAVE_PLACE = {0: [0, 2], 1: [1, 3]}  # interleaved 1F1B's
RESUME_PLACE = {0: [0, 3], 1: [1, 2]}  # ZB-V's


def _lp(n_stages: int, seed: int) -> LocalPipeline:
    torch.manual_seed(seed)
    net = nn.Sequential(*(nn.Linear(4, 4) for _ in range(4))).double()
    spec = {str(i): SplitPoint.END for i in range(4 // n_stages - 1, 3, 4 // n_stages)}
    cls = pippy.Schedule1F1B if n_stages == 2 else pippy.ScheduleZBV
    return LocalPipeline(pipeline(net, 2, (X,), split_spec=spec), cls, num_ranks=2, n_microbatches=2, loss_fn=mse)


def _rank_opts(lp: LocalPipeline, place: dict[int, list[int]], lr: float | None = None) -> dict[int, torch.optim.SGD]:
    """Per rank, SGD with one group per layer of its stages, in the order it holds them (``lr``: a wrong start)."""
    opts = {}
    for r, idx in place.items():
        groups = [{"params": list(lp.stages[i].submod.get_submodule(layer).parameters()),
                   "lr": LR[layer] if lr is None else lr, "layer": layer}
                  for i in idx for layer in sorted({n.split(".")[0] for n, _ in lp.stages[i].submod.named_parameters()})]
        opts[r] = torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    return opts


def _train(lp: LocalPipeline, opts: dict[int, torch.optim.SGD], steps: int) -> None:
    train_steps(lp, opts.values(), steps, X, Y)


def _params(lp: LocalPipeline) -> dict[str, torch.Tensor]:
    return {k: v.clone() for st in lp.stages for k, v in st.state_dict().items()}


def _resumes_exactly(tmp_path: Path, fmt: str, build: Callable[[], Any], fresh: Callable[[], Any], before: int,
                     after: int, check: Callable[[LocalPipeline, Any], None]) -> None:
    """``before`` steps, save, load into ``fresh()``'s stages and optimizer (``check`` them), ``after`` more steps:
    the parameters equal ``before + after`` uninterrupted steps of ``build()``'s, bit for bit."""
    lp, opt = build()
    _train(lp, {0: opt}, before + after)
    want = _params(lp)
    lp, opt = build()
    _train(lp, {0: opt}, before)
    checkpoint.save(lp.stages, tmp_path, format=fmt, optimizer=opt)
    lp, opt = fresh()
    checkpoint.load(lp.stages, tmp_path, optimizer=opt)
    check(lp, opt)
    _train(lp, {0: opt}, after)
    got = _params(lp)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize(("fmt", "saved_stages"), [("torch", 4), ("dcp", 4), ("dcp", 2)],
                         ids=["torch-placement", "dcp-placement", "dcp-resplit"])
def test_a_resume_in_another_placement_or_split_keeps_each_groups_learning_rate(
        tmp_path: Path, fmt: str, saved_stages: int) -> None:
    lp = _lp(4, seed=0)
    _train(lp, _rank_opts(lp, SAVE_PLACE), 4)
    want = _params(lp)

    lp = _lp(saved_stages, seed=0)
    place = SAVE_PLACE if saved_stages == 4 else {0: [0], 1: [1]}
    opts = _rank_opts(lp, place)
    _train(lp, opts, 2)
    for r, idx in place.items():
        checkpoint.save([lp.stages[i] for i in idx], tmp_path, format=fmt, optimizer=opts[r])
    lp = _lp(4, seed=1)  # another init: everything comes from the checkpoint
    opts = _rank_opts(lp, RESUME_PLACE, lr=0.5)
    for r, idx in RESUME_PLACE.items():
        checkpoint.load([lp.stages[i] for i in idx], tmp_path, optimizer=opts[r])
    assert [(g["layer"], g["lr"]) for o in opts.values() for g in o.param_groups] == [
        (layer, LR[layer]) for layer in ("0", "3", "1", "2")]
    _train(lp, opts, 2)
    got = _params(lp)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_one_group_over_parameters_saved_with_different_hyperparameters_is_refused(tmp_path: Path, fmt: str) -> None:
    lp = _lp(4, seed=0)
    opts = _rank_opts(lp, SAVE_PLACE)
    _train(lp, opts, 1)
    for r, idx in SAVE_PLACE.items():
        checkpoint.save([lp.stages[i] for i in idx], tmp_path, format=fmt, optimizer=opts[r])
    mine = [lp.stages[1], lp.stages[2]]
    one = torch.optim.SGD([p for st in mine for p in st.parameters()], lr=0.5, momentum=0.9)
    with pytest.raises(ValueError, match=r"optimizer group 0 holds parameters that the checkpoint's optimizer kept in "
                                         r"groups with different hyperparameters: layer='1' lr=0.02 for \[stage 1 "
                                         r"'1.weight', stage 1 '1.bias'\]; layer='2' lr=0.03 for \[stage 2 '2.weight', "
                                         r".*one param group per set"):
        checkpoint.load(mine, tmp_path, optimizer=one)


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_two_stage_copies_of_one_fqn_resume_with_their_own_optimizer_state(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(0)
    base = SharedEnds().double()

    def build(model: nn.Module) -> tuple[LocalPipeline, torch.optim.Adam]:
        lp = LocalPipeline(pipeline(copy.deepcopy(model), 4, (X,)), pippy.ScheduleZBV, num_ranks=2, n_microbatches=4,
                           loss_fn=mse)
        return lp, torch.optim.Adam([p for st in lp.stages for p in st.parameters()], lr=1e-2)

    def fresh() -> tuple[LocalPipeline, torch.optim.Adam]:
        torch.manual_seed(1)
        return build(SharedEnds().double())

    def check(lp: LocalPipeline, opt: torch.optim.Adam) -> None:
        first, last = (lp.stages[i].submod.get_parameter("shared.weight") for i in (0, 3))
        assert opt.state[first]["exp_avg"].data_ptr() != opt.state[last]["exp_avg"].data_ptr()

    _resumes_exactly(tmp_path, fmt, lambda: build(base), fresh, 2, 3, check)


class Unused(nn.Module):
    """``aux`` is trainable but the loss never reads it: no gradient, so no optimizer state (as unpipelined)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.aux = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.a(x))
        return self.b(h), self.aux(h)


def _first_output_mse(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out[0], y)


_first_output_mse.reduction = "mean"  # type: ignore[attr-defined]


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_parameter_without_optimizer_state_resumes_exactly(tmp_path: Path, fmt: str) -> None:
    def build(seed: int) -> tuple[LocalPipeline, torch.optim.Adam]:
        torch.manual_seed(seed)
        pipe = pipeline(Unused().double(), 2, (X,), split_spec={"a": SplitPoint.END})
        lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=_first_output_mse)
        return lp, torch.optim.Adam([p for st in lp.stages for p in st.parameters()], lr=1e-2)

    def check(lp: LocalPipeline, opt: torch.optim.Adam) -> None:
        aux = lp.stages[1].submod.get_parameter("aux.weight")
        assert not opt.state.get(aux) and len(opt.state) == 4  # a.* and b.* have state, aux.* none, as saved

    _resumes_exactly(tmp_path, fmt, lambda: build(0), lambda: build(1), 1, 2, check)


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_tensor_and_tuple_hyperparameters_round_trip(tmp_path: Path, fmt: str) -> None:
    def build(seed: int) -> tuple[LocalPipeline, torch.optim.Adam]:
        lp = _lp(2, seed)
        opt = torch.optim.Adam([p for st in lp.stages for p in st.parameters()], lr=torch.tensor(0.01) if seed == 0
                               else torch.tensor(0.5), betas=(0.8, 0.95) if seed == 0 else (0.5, 0.5))
        return lp, opt

    def check(lp: LocalPipeline, opt: torch.optim.Adam) -> None:
        lr, betas = opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]
        assert isinstance(lr, torch.Tensor) and torch.equal(lr, torch.tensor(0.01)) and betas == (0.8, 0.95), (lr, betas)

    _resumes_exactly(tmp_path, fmt, lambda: build(0), lambda: build(1), 1, 2, check)


class _Opaque:
    pass


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_hyperparameter_that_cannot_be_stored_is_refused_before_anything_is_written(tmp_path: Path, fmt: str) -> None:
    lp = _lp(2, 0)
    opt = torch.optim.SGD([p for st in lp.stages for p in st.parameters()], lr=0.1)
    opt.param_groups[0]["tag"] = _Opaque()
    with pytest.raises(ValueError, match=r"param groups hold values a checkpoint cannot store safely \(group 0 "
                                         r"tag=_Opaque\).*nothing was written"):
        checkpoint.save(lp.stages, tmp_path / "ck", format=fmt, optimizer=opt)
    assert not (tmp_path / "ck").exists()

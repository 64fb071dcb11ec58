"""Checkpoint records (``stage_<i>.json``): ``load`` follows the recorded format and files, never an older save's."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from pippy import SplitPoint, checkpoint, pipeline
from pippy.checkpoint_files import read_records


def _stages() -> list:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    pipe = pipeline(net, 2, (torch.randn(4, 4),), split_spec={"0": SplitPoint.END})
    return [pipe.build_stage(i, "cpu") for i in range(2)]


def _bump(stages: list) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for st in stages:
            for p in st.parameters():
                p.add_(1.0)
    return {k: v.clone() for st in stages for k, v in st.state_dict().items()}


def test_a_dcp_checkpoint_loads_without_naming_its_format_and_a_wrong_one_is_refused(tmp_path: Path) -> None:
    stages = _stages()
    want = _bump(stages)
    checkpoint.save(stages, tmp_path, format="dcp")
    _bump(stages)
    checkpoint.load(stages, tmp_path)  # the records say "dcp"
    assert all(torch.equal(v, want[k]) for st in stages for k, v in st.state_dict().items())
    with pytest.raises(ValueError, match=r"load\(..., format='torch'\) but checkpoint .* was saved with format='dcp' "
                                         r".*pass format='dcp' or leave format out"):
        checkpoint.load(stages, tmp_path, format="torch")


def test_a_newer_save_in_another_format_wins_over_the_older_files(tmp_path: Path) -> None:
    stages = _stages()
    checkpoint.save(stages, tmp_path, format="torch")  # step 100: stage_<i>.step0.pt
    newer = _bump(stages)
    checkpoint.save(stages, tmp_path, format="dcp")  # step 200, same directory
    _bump(stages)
    checkpoint.load(stages, tmp_path)
    assert all(torch.equal(v, newer[k]) for st in stages for k, v in st.state_dict().items())
    assert all(torch.equal(v, newer[k]) for k, v in checkpoint.merge(tmp_path).items())
    checkpoint.save(stages, tmp_path / "t", format="torch")
    with pytest.raises(ValueError, match=r"saved with format='torch'.*pass format='torch'"):
        checkpoint.load(stages, tmp_path / "t", format="dcp")


def test_records_name_their_files_and_a_mix_of_splits_is_refused(tmp_path: Path) -> None:
    stages = _stages()
    opt = torch.optim.SGD([p for st in stages for p in st.parameters()], lr=0.1)
    checkpoint.save(stages, tmp_path, format="dcp", optimizer=opt)
    assert [(r.tensors, r.optim) for r in read_records(tmp_path)] == [("dcp", "dcp_optim")] * 2
    checkpoint.save(stages, tmp_path / "t")
    assert [(r.tensors, r.optim) for r in read_records(tmp_path / "t")] == [("stage_0.step0.pt", None), ("stage_1.step0.pt", None)]
    with pytest.raises(FileNotFoundError, match="saved without an optimizer"):
        checkpoint.load(stages, tmp_path / "t", optimizer=opt)
    side = json.loads((tmp_path / "stage_1.json").read_text())
    (tmp_path / "stage_1.json").write_text(json.dumps({**side, "num_stages": 3}))
    with pytest.raises(ValueError, match=r"mixes saves: stage_0.json is from a split of 2 stages but stage_1.json from "
                                         "one of 3"):
        checkpoint.merge(tmp_path)


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_batch_norm_statistics_and_counts_round_trip(tmp_path: Path, fmt: str) -> None:
    """Running mean / var and ``num_batches_tracked`` of a trained batch norm come back from save / load and merge."""
    from models import mse, train_steps

    from pippy import Schedule1F1B
    from pippy.runtime.local import LocalPipeline

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))

    def build(seed: int) -> tuple[torch.nn.Module, LocalPipeline]:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batch norm in train mode")
            pipe = pipeline(net, 2, (x,), split_spec={"1": SplitPoint.END})
        return net, LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=mse)

    net, lp = build(0)
    train_steps(lp, [torch.optim.SGD([p for st in lp.stages for p in st.parameters()], lr=0.1)], 2, x, x)
    want = {k: v.clone() for st in lp.stages for k, v in st.state_dict().items()}
    assert want["1.num_batches_tracked"].item() == 4 and not torch.equal(want["1.running_var"], torch.ones(4))
    checkpoint.save(lp.stages, tmp_path, format=fmt)
    net, lp = build(1)
    checkpoint.load(lp.stages, tmp_path)
    got = {k: v for st in lp.stages for k, v in st.state_dict().items()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    net.load_state_dict(checkpoint.merge(tmp_path), strict=True)
    assert net[1].num_batches_tracked.item() == 4

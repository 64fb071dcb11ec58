"""DCP checkpoints: a save call per stage keeps every stage; loads follow the records (tied aliases included) and check them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from models import mse, train_steps
from torch import nn

import pippy
from pippy import SplitPoint, checkpoint, pipeline
from pippy.runtime.local import LocalPipeline

X = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
Y = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _lp(seed: int) -> tuple[LocalPipeline, list[torch.optim.Adam]]:
    """4 stages (ZB-V on 2 ranks), one Adam per stage."""
    torch.manual_seed(seed)
    net = nn.Sequential(*(nn.Linear(4, 4) for _ in range(4))).double()
    pipe = pipeline(net, 2, (X,), split_spec={str(i): SplitPoint.END for i in range(3)})
    lp = LocalPipeline(pipe, pippy.ScheduleZBV, num_ranks=2, n_microbatches=2, loss_fn=mse)
    return lp, [torch.optim.Adam(st.parameters(), lr=1e-2) for st in lp.stages]


def _train(lp: LocalPipeline, opts: list[torch.optim.Adam], steps: int) -> None:
    train_steps(lp, opts, steps, X, Y)


def _params(lp: LocalPipeline) -> dict[str, torch.Tensor]:
    return {k: v.clone() for st in lp.stages for k, v in st.state_dict().items()}


def test_saving_stage_by_stage_keeps_every_stage_and_resumes_exactly(tmp_path: Path) -> None:
    lp, opts = _lp(0)
    _train(lp, opts, 4)
    want = _params(lp)
    lp, opts = _lp(0)
    _train(lp, opts, 2)
    saved = _params(lp)
    for st, o in zip(lp.stages, opts):  # one call per stage, as with one optimizer per stage
        checkpoint.save([st], tmp_path, format="dcp", optimizer=o)
    merged = checkpoint.merge(tmp_path)
    assert merged.keys() == saved.keys() and all(torch.equal(merged[k], saved[k]) for k in saved)
    lp, opts = _lp(1)
    for st, o in zip(lp.stages, opts):
        checkpoint.load([st], tmp_path, optimizer=o)
    _train(lp, opts, 2)
    got = _params(lp)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_checkpoint_whose_dcp_files_lack_recorded_keys_is_refused(tmp_path: Path) -> None:
    """As older pippy left it: four per-stage saves into one ``dcp`` directory, only the last stage's tensors kept."""
    lp, opts = _lp(0)
    for st, o in zip(lp.stages, opts):
        checkpoint.save([st], tmp_path, format="dcp", optimizer=o)
    for i in range(4):
        side = json.loads((tmp_path / f"stage_{i}.json").read_text())
        del side["files"]  # an older record: its tensors in <dir>/dcp
        (tmp_path / f"stage_{i}.json").write_text(json.dumps(side))
    shutil.move(tmp_path / "dcp_stages_3", tmp_path / "dcp")
    shutil.move(tmp_path / "dcp_optim_stages_3", tmp_path / "dcp_optim")
    with pytest.raises(KeyError, match=r"is incomplete: stage_0.json records \['0.bias', '0.weight'\] in dcp, which "
                                       r"lacks them"):
        checkpoint.merge(tmp_path)
    with pytest.raises(KeyError, match=r"is incomplete: stage_0.json records \['0.bias', '0.weight'\] in dcp/"):
        checkpoint.load(lp.stages[3], tmp_path)


def test_a_dcp_checkpoint_saved_with_transmitted_ties_loads_into_replicated_ones(tmp_path: Path) -> None:
    T = pytest.importorskip("transformers")
    cfg = dict(n_layer=2, n_embd=16, n_head=2, vocab_size=48, n_positions=16, use_cache=False, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(1, 48, (4, 8), generator=torch.Generator().manual_seed(0))

    def build(seed: int, tied: str) -> tuple[LocalPipeline, torch.optim.Adam]:
        torch.manual_seed(seed)
        model = T.GPT2LMHeadModel(T.GPT2Config(**cfg)).double().eval()
        pipe = pipeline(model, 4, (ids,), {"labels": ids}, split_spec={"transformer.h.0": SplitPoint.END},
                        tied_weights=tied)
        lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=4)
        return lp, torch.optim.Adam([p for st in lp.stages for p in st.parameters()], lr=1e-2)

    lp, opt = build(0, "transmit")
    opt.zero_grad()
    lp.step(ids, labels=ids)
    opt.step()
    wte = lp.stages[0].submod.get_parameter("transformer.wte.weight")
    checkpoint.save(lp.stages, tmp_path, format="dcp", optimizer=opt)
    lp, opt = build(4, "replicate")
    checkpoint.load(lp.stages, tmp_path, optimizer=opt)
    first = lp.stages[0].submod.get_parameter("transformer.wte.weight")
    head = lp.stages[1].submod.get_parameter("lm_head.weight")
    assert torch.equal(first, wte) and torch.equal(head, wte)
    assert torch.equal(opt.state[head]["exp_avg"], opt.state[first]["exp_avg"])
    assert opt.state[head]["exp_avg"].data_ptr() != opt.state[first]["exp_avg"].data_ptr()


def _dcp_dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.startswith("dcp"))


def test_a_save_with_another_grouping_removes_the_older_sub_directories_pippy_wrote(tmp_path: Path) -> None:
    lp, opts = _lp(0)
    _train(lp, opts, 1)
    joint = torch.optim.Adam([p for o in opts for g in o.param_groups for p in g["params"]], lr=1e-2)
    checkpoint.save(lp.stages, tmp_path, format="dcp", optimizer=joint)  # every stage at once: dcp, dcp_optim
    (tmp_path / "dcp_stages_9").mkdir()  # not pippy's (no mark): kept, as is any other file
    (tmp_path / "dcp_stages_9" / ".metadata").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "dcp_optim" / "notes.txt").write_text("mine")
    for st, o in zip(lp.stages[:3], opts):
        checkpoint.save([st], tmp_path, format="dcp", optimizer=o)
        assert {"dcp", "dcp_optim"} <= set(_dcp_dirs(tmp_path))  # stage 3's record still names them
    with pytest.warns(UserWarning, match=r"stale DCP sub-directory .*dcp_optim .* also holds files pippy did not "
                                         r"write \(\['notes.txt'\]\)"):
        checkpoint.save(lp.stages[3], tmp_path, format="dcp", optimizer=opts[3])  # the last one: dcp goes
    assert _dcp_dirs(tmp_path) == sorted(["dcp_optim", "dcp_stages_9"] + [f"dcp{k}_stages_{i}" for i in range(4)
                                                                         for k in ("", "_optim")])
    assert sorted(p.name for p in (tmp_path / "dcp_optim").iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "dcp_stages_9" / ".metadata").exists()
    saved = _params(lp)
    checkpoint.save(lp.stages, tmp_path, format="dcp")  # at once again: the per-stage directories go
    assert _dcp_dirs(tmp_path) == ["dcp", "dcp_optim", "dcp_stages_9"]
    merged = checkpoint.merge(tmp_path)
    assert all(torch.equal(merged[k], saved[k]) for k in saved)
    checkpoint.save(lp.stages, tmp_path, format="torch")  # another format: no DCP directory is named any more
    assert _dcp_dirs(tmp_path) == ["dcp_optim", "dcp_stages_9"]

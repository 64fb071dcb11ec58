"""Every zoo architecture: save the stages, merge, and the result loads with strict=True into the plain model, value for value."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from zoo_models import ZOO, build
from zoo_pippy_models import PIPPY_ZOO

from pippy import checkpoint, pipeline
from pippy.hf import split_spec_equal_layers


@pytest.mark.parametrize("name", ZOO + PIPPY_ZOO)
def test_save_merge_strict_load(name: str, tmp_path) -> None:
    case = build(name)
    spec = split_spec_equal_layers(case.model, 2, case.layers)
    pipe = pipeline(case.model, 2, case.args, case.kwargs, split_spec=spec)
    stages = [pipe.build_stage(i, "cpu") for i in range(pipe.num_stages)]
    with torch.no_grad():  # the stages diverge from the traced model, as after training
        for st in stages:
            for p in st.submod.parameters():
                p.add_(0.5)
    checkpoint.save(stages, tmp_path)
    merged = checkpoint.merge(tmp_path)
    fresh = build(name).model
    fresh.load_state_dict(merged, strict=True)
    want = {n: t for st in stages for n, t in st.submod.state_dict().items()}
    for n, t in fresh.state_dict().items():
        assert torch.equal(t, want[n]) if n in want else torch.equal(t, merged[n]), (name, n)

"""The HF zoo traced once with dynamic_shapes="auto": a step at the traced length, then at another, no retrace."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from zoo_models import SEQ, ZOO, build, grad_err, max_err

from pippy import Schedule1F1B, pipeline
from pippy.frontend.trace import trace_count
from pippy.hf import split_spec_equal_layers
from pippy.runtime.local import LocalPipeline

IMAGES = {"vit", "clip_vision", "resnet", "convnext", "whisper"}  # fixed input sizes: the batch varies instead
TOL = 1e-10


def _longer(x: Any, new: int) -> Any:
    """Token ids, masks and per-token targets ([b, SEQ, ...]) grown to ``new`` by repeating their start."""
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == SEQ:
        return torch.cat([x, x[:, : new - SEQ]], 1)
    return x


def _doubled(x: Any) -> Any:
    return torch.cat([x, x.flip(0)], 0) if isinstance(x, torch.Tensor) and x.dim() >= 1 else x


@pytest.mark.parametrize("name", ZOO)
def test_zoo_other_length_without_retrace(name: str) -> None:
    case = build(name)
    spec = split_spec_equal_layers(case.model, 2, case.layers)
    pipe = pipeline(case.model, 2, case.args, case.kwargs, split_spec=spec, dynamic_shapes="auto")
    traced = trace_count()
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=case.loss_fn, loss_reduction="mean",
                       output_merge_spec=case.extra.get("output_merge_spec"))
    grow = _doubled if name in IMAGES else (lambda x: _longer(x, SEQ + 5))
    args, kwargs = tuple(grow(a) for a in case.args), {k: grow(v) for k, v in case.kwargs.items()}
    target = grow(case.target)
    assert any(isinstance(v, torch.Tensor) and v.shape != case.kwargs[k].shape for k, v in kwargs.items()) or any(
        a.shape != b.shape for a, b in zip(args, case.args) if isinstance(a, torch.Tensor)), name
    ref = copy.deepcopy(case.model)
    out_ref = ref(*args, **kwargs)
    loss_ref = case.loss_fn(out_ref, target) if case.loss_fn else out_ref.loss
    loss_ref.backward()
    out = lp.step(*args, target=target, **kwargs)
    tol = 1e-6 if case.loss_fn is None else TOL  # HF's own losses upcast logits to float32
    assert max_err(out, out_ref) < tol, name
    assert grad_err(ref, lp.named_grads()) < TOL, name
    assert trace_count() == traced, f"{name}: traced again"

"""The diffusers UNet of PiPPy's examples (``pippy_unet.py``): traced, split in two and trained, exactly (skipped without diffusers)."""

from __future__ import annotations

import copy

import pytest
import torch

from pippy import Schedule1F1B, pipeline
from pippy.hf import split_spec_equal_layers
from pippy.runtime.local import LocalPipeline

diffusers = pytest.importorskip("diffusers")

TOL = 1e-12


def _loss(out, target):
    return ((out.sample - target) ** 2).mean()


_loss.reduction = "mean"  # type: ignore[attr-defined]


def test_unet2d_two_stages_is_transparent() -> None:
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    ).double()
    ref = copy.deepcopy(model)
    x, t, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor(10), torch.randn(4, 3, 16, 16, dtype=torch.float64)
    pipe = pipeline(model, 2, (x, t), split_spec=split_spec_equal_layers(model, 2))
    assert pipe.num_stages == 2
    torch.testing.assert_close(pipe(x, t)[0], ref(x, t).sample, rtol=0, atol=TOL)
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=_loss)
    losses: list[torch.Tensor] = []
    out = lp.step(x, t, target=y, losses=losses)
    ref_loss = _loss(ref(x, t), y)
    ref_loss.backward()
    torch.testing.assert_close(out.sample, ref(x, t).sample, rtol=0, atol=TOL)
    assert abs(float(torch.stack(losses).mean()) - float(ref_loss)) < TOL
    grads = lp.named_grads()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=TOL, msg=name)

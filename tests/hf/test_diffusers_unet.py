"""The diffusers UNet of PiPPy's examples (``pippy_unet.py``): traced, split in two and trained, exactly (skipped without diffusers)."""

from __future__ import annotations

import copy

import pytest
import torch

from pippy import Schedule1F1B, SplitPoint, pipeline
from pippy.hf import layer_names, split_spec_equal_layers
from pippy.runtime.local import LocalPipeline

diffusers = pytest.importorskip("diffusers")

from zoo_models import first_calls  # noqa: E402  (after the skip: it is a helper of these tests)

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


def _stage_params(model: torch.nn.Module, n: int, args: tuple[torch.Tensor, ...]) -> list[int]:
    """Parameters per stage of ``n`` stages from ``split_spec_equal_layers``; the pipe's outputs equal the model's."""
    pipe = pipeline(model, 2, args, split_spec=split_spec_equal_layers(model, n))
    assert pipe.num_stages == n
    torch.testing.assert_close(pipe(*args)[0], model(*args).sample, rtol=0, atol=TOL)
    return [sum(p.numel() for p in pipe.get_stage_module(s).parameters()) for s in range(n)]


# Registered down_blocks, up_blocks, then mid_block (set to None first, a module later), and run down, mid, up. The
# down and up lists mix block classes; a block is one layer, or its own resnets/attentions where it holds a list of them.
_UNET2D = ["down_blocks.0", "down_blocks.1", "mid_block.resnets.0", "mid_block.resnets.1", "up_blocks.0.resnets.0",
           "up_blocks.0.attentions.0", "up_blocks.0.resnets.1", "up_blocks.0.attentions.1", "up_blocks.1.resnets.0",
           "up_blocks.1.resnets.1"]


def test_unet2d_layers_in_execution_order_and_equal_stages() -> None:
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    ).double()
    args = (torch.randn(4, 2, 8, 8, dtype=torch.float64), torch.tensor([1, 5, 10, 20]))
    assert layer_names(model) == _UNET2D
    assert first_calls(model, _UNET2D, *args) == _UNET2D
    # 8 layers (a resnet with its attention is one): 2 per stage; before, the last stage held only conv_out (162)
    assert split_spec_equal_layers(model, 4) == {n: SplitPoint.END for n in ("down_blocks.1", "mid_block.resnets.1",
                                                                             "up_blocks.0.attentions.1")}
    sizes = _stage_params(model, 4, args)  # [8872, 11584, 17136, 7522] with diffusers 0.42
    assert min(sizes) > sum(sizes) / 8, sizes


def test_unet2d_condition_layers_in_execution_order_and_equal_stages() -> None:
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4,
    ).double()
    args = (torch.randn(4, 2, 8, 8, dtype=torch.float64), torch.tensor([1, 5, 10, 20]),
            torch.randn(4, 3, 8, dtype=torch.float64))
    names = ["down_blocks.0", "down_blocks.1", "mid_block.resnets.0", "mid_block.resnets.1", "up_blocks.0.resnets.0",
             "up_blocks.0.resnets.1", "up_blocks.1.resnets.0", "up_blocks.1.attentions.0", "up_blocks.1.resnets.1",
             "up_blocks.1.attentions.1"]
    assert layer_names(model) == names
    assert first_calls(model, names, *args) == names
    sizes = _stage_params(model, 4, args)  # [9328, 16176, 14896, 10674] with diffusers 0.42
    assert min(sizes) > sum(sizes) / 8, sizes

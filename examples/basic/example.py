"""The PiPPy README example, as written: three Linear+ReLU blocks and a projection, split at layer0 and layer1.

Run:  .venv/bin/torchrun --nproc-per-node 3 examples/basic/example.py
Rank 0 feeds the batch, every rank runs its stage, and the last rank prints the merged output's
shape and its difference from the unpipelined model.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

from pippy import SplitPoint, annotate_split_points, pipeline
from pippy.PipelineStage import PipelineStage

in_dim = 512
layer_dims = [512, 1024, 256]
out_dim = 10


class MyNetworkBlock(torch.nn.Module):
    """Linear + ReLU."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


class MyNetwork(torch.nn.Module):
    """Three blocks and an output projection."""

    def __init__(self, in_dim: int, layer_dims: list[int]) -> None:
        super().__init__()
        prev_dim = in_dim
        for i, dim in enumerate(layer_dims):
            setattr(self, f"layer{i}", MyNetworkBlock(prev_dim, dim))
            prev_dim = dim
        self.num_layers = len(layer_dims)
        self.output_proj = torch.nn.Linear(layer_dims[-1], out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i}")(x)
        return self.output_proj(x)


def main() -> None:
    dist.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    mn = MyNetwork(in_dim, layer_dims)
    ref = copy.deepcopy(mn)

    annotate_split_points(mn, {"layer0": SplitPoint.END, "layer1": SplitPoint.END})
    batch_size = 32
    example_input = torch.randn(batch_size, in_dim)
    chunks = 4
    pipe = pipeline(mn, chunks, example_args=(example_input,))
    if rank == 0:
        print(pipe)

    stage = PipelineStage(pipe, rank, torch.device("cpu"))
    output = stage(example_input) if rank == 0 else stage()
    if rank == world - 1:
        diff = (output - ref(example_input)).abs().max().item()
        print(f"rank {rank}: output {tuple(output.shape)}, max |diff| vs unpipelined model {diff:.2e}")
        assert diff < 1e-5
    else:
        assert output is None
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Peak activation memory per rank with and without activation recompute (GPT-2 from config, 2 ranks, 1F1B).

Run:  .venv/bin/torchrun --nproc-per-node 2 benchmarks/recompute_memory.py
The runtime counts the bytes autograd saves for every live micro-batch (each storage once,
parameters excluded); rank 0 prints each rank's peak for both settings and the saving.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

import pippy
from pippy import SplitPoint, pipeline


def lm_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Token cross entropy."""
    return torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), target.reshape(-1))


def peak_bytes(recompute: bool, rank: int) -> int:
    """Peak live activation bytes on this rank over one training step."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=2048, n_positions=128, use_cache=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    x, y = torch.randint(0, 2048, (16, 128)), torch.randint(0, 2048, (16, 128))
    pipe = pipeline(model, 4, example_args=(x,), split_spec={"transformer.h.1": SplitPoint.END})
    stage = pipe.build_stage(rank, "cpu", recompute=recompute)
    stage.measure_activations = True
    sched = pippy.Schedule1F1B(stage, 4, loss_fn=lm_loss)
    sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None)
    return sched.last_peak_bytes.get(rank, 0)


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    rows = []
    for rc in (False, True):
        mine = torch.tensor([peak_bytes(rc, rank)])
        got = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
        dist.all_gather(got, mine)
        rows.append([int(t.item()) for t in got])
    if rank == 0:
        print("rank  no recompute (MiB)  recompute (MiB)  saved")
        for r, (a, b) in enumerate(zip(*rows)):
            print(f"{r:4d}  {a / 2**20:18.2f}  {b / 2**20:15.2f}  {1 - b / a:6.1%}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

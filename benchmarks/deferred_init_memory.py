"""Deferred init memory: each rank holds only its stage's parameters (about 1/p of the model).

Run:  torchrun --nproc-per-node 2 benchmarks/deferred_init_memory.py [--layers 8 --hidden 256]

Rank 0 first writes a full checkpoint (safetensors) of a real Llama built from config. Then every
rank builds the model on the meta device, traces it, builds its own stage and loads only that
stage's tensors from the checkpoint. Prints each rank's resident parameter bytes and the ratio to
the whole model. Nothing is asserted; no weights are downloaded.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import transformers as T
from safetensors.torch import save_file

import pippy
from pippy.frontend.materialize import materialize_stage
from pippy.hf import split_spec_equal_layers


def _bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if not t.is_meta:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = T.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=8,
                        num_key_value_heads=4, intermediate_size=4 * a.hidden, max_position_embeddings=128,
                        use_cache=False)
    tmp = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(tmp, src=0)
    ckpt = os.path.join(str(tmp[0]), "model.safetensors")
    if rank == 0:  # setup only: the one place a full model exists
        torch.manual_seed(0)
        save_file(T.LlamaForCausalLM(cfg).state_dict(), ckpt)
    dist.barrier()

    with torch.device("meta"):
        meta = T.LlamaForCausalLM(cfg)
    full = sum(p.numel() * p.element_size() for p in meta.parameters())
    ids = torch.randint(0, a.vocab, (4, 32))
    pipe = pippy.pipeline(meta, 2, (ids,), {"labels": ids}, split_spec=split_spec_equal_layers(meta, world))
    stage = pipe.build_stage(rank, "cpu")
    materialize_stage(stage, checkpoint=ckpt, init_fn=meta._init_weights, model=meta)
    mine = _bytes(list(stage.submod.parameters()))
    meta_left = sum(1 for p in meta.parameters() if not p.is_meta)
    row = f"rank {rank}: stage {rank} resident parameter bytes {mine:>12,}  = {mine / full:6.1%} of the model"
    rows: list[str | None] = [None] * world
    dist.all_gather_object(rows, row + f"  (meta model tensors materialized: {meta_left})")
    if rank == 0:
        print(f"model: Llama {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}: {full:,} parameter bytes (float32)")
        print(f"ideal share per rank: {1 / world:.1%}")
        for r in rows:
            print(r)
        os.remove(ckpt)
        os.rmdir(str(tmp[0]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""GPT-2 (LM head tied to the token embedding) pipelined over 2 ranks, loss computed inside the model.

Run:  torchrun --nproc-per-node 2 examples/huggingface/gpt2.py

Built from config (random weights, nothing downloaded). ``labels`` are a keyword input: they enter
at stage 0 and travel to the last stage, where the model computes its own loss (loss_fn=None).
The tied ``lm_head.weight`` / ``transformer.wte.weight`` gradients are summed across stages.
"""

import torch
from _common import init, train_and_check
from transformers import GPT2Config, GPT2LMHeadModel

if __name__ == "__main__":
    rank, world = init()
    cfg = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=64, use_cache=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 128, (8, 32))  # [batch, seq]
    train_and_check(model, (ids,), {"labels": ids})

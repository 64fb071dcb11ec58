"""T5 (encoder-decoder) as 4 stages on 2 ranks: two stages in the encoder, two in the decoder.

Run:  torchrun --nproc-per-node 2 examples/huggingface/t5.py

Interleaved 1F1B places stages 0, 2 on rank 0 and 1, 3 on rank 1. The encoder output feeds both
decoder stages (skip edges), and the shared embedding sits in stages 0, 2 and 3 (tied weights).
"""

import torch
from _common import init, train_and_check
from transformers import T5Config, T5ForConditionalGeneration

if __name__ == "__main__":
    rank, world = init()
    cfg = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=4, num_decoder_layers=4, num_heads=4,
                   dropout_rate=0.0, use_cache=False, decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(cfg)
    src = torch.randint(1, 128, (8, 16))  # [batch, src_len]
    tgt = torch.randint(1, 128, (8, 12))  # [batch, tgt_len]
    train_and_check(model, (src,), {"labels": tgt}, stages_per_rank=2)

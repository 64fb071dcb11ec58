"""Llama (RMSNorm, rotary embeddings, grouped-query attention) pipelined over 2 ranks.

Run:  torchrun --nproc-per-node 2 examples/huggingface/llama.py

Built from config (random weights, nothing downloaded); the loss is computed inside the model from
``labels``. Note: Hugging Face upcasts logits to float32 for that loss, so losses agree to ~1e-7
while gradients agree to float64 precision.
"""

import torch
from _common import init, train_and_check
from transformers import LlamaConfig, LlamaForCausalLM

if __name__ == "__main__":
    rank, world = init()
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64, use_cache=False)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (8, 32))  # [batch, seq]
    train_and_check(model, (ids,), {"labels": ids})

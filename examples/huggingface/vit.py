"""ViT image classification pipelined over 2 ranks.

Run:  torchrun --nproc-per-node 2 examples/huggingface/vit.py

Built from config (random weights, nothing downloaded): patch embedding and the first half of the
encoder on rank 0, the rest and the classifier on rank 1.
"""

import torch
import torch.nn.functional as F
from _common import init, train_and_check
from transformers import ViTConfig, ViTForImageClassification


def logits_ce(out, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy of the logits, mean over the batch."""
    return F.cross_entropy(out.logits, y)


logits_ce.reduction = "mean"  # type: ignore[attr-defined]  # tells pippy it averages (else it warns and assumes so)


if __name__ == "__main__":
    rank, world = init()
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(cfg)
    pixels = torch.randn(8, 3, 32, 32, dtype=torch.float64)  # [batch, channels, height, width]
    labels = torch.randint(0, 10, (8,))
    train_and_check(model, (pixels,), {}, loss_fn=logits_ce, target=labels)

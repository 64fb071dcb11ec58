"""BERT sequence classification pipelined over 2 ranks, with a padding attention mask.

Run:  torchrun --nproc-per-node 2 examples/huggingface/bert.py

Built from config (random weights, nothing downloaded); the loss (cross entropy on the logits)
runs on the last rank, whose ``step`` gets the class targets.
"""

import torch
import torch.nn.functional as F
from _common import init, train_and_check
from transformers import BertConfig, BertForSequenceClassification


def logits_ce(out, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy of the logits, mean over the batch."""
    return F.cross_entropy(out.logits, y)


logits_ce.reduction = "mean"  # type: ignore[attr-defined]  # tells pippy it averages (else it warns and assumes so)


if __name__ == "__main__":
    rank, world = init()
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=128, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    ids = torch.randint(1, 128, (8, 16))  # [batch, seq]
    mask = torch.ones(8, 16, dtype=torch.long)
    mask[::2, -4:] = 0  # every other sequence is padded
    labels = torch.randint(0, 3, (8,))
    train_and_check(model, (ids,), {"attention_mask": mask},
                    loss_fn=logits_ce, target=labels)

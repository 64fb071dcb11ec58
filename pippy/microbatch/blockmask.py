"""Flex attention's ``BlockMask`` split into micro-batches: its rows along the batch dim, its ``mask_mod`` shifted.

A ``BlockMask`` built for a batch of ``B`` rows (``create_block_mask(mask_mod, B, H, Q, KV)``) holds per-row block
tables and a ``mask_mod(b, h, q, kv)`` that reads row ``b`` of the full batch. A micro-batch of rows
``[s, s + k)`` needs those rows' tables and a ``mask_mod`` that maps its own row ``b`` to ``s + b``. A mask made
for one row (``B=1``) broadcasts over every row, and every micro-batch gets it whole.

    >>> import torch
    >>> from torch.nn.attention.flex_attention import create_block_mask
    >>> lengths = torch.tensor([16, 32, 48, 64])
    >>> def same_doc(b, h, q, kv):
    ...     return (q // lengths[b] == kv // lengths[b]) & (q >= kv)
    >>> mask = create_block_mask(same_doc, 4, 1, 64, 64, device="cpu", BLOCK_SIZE=16)
    >>> parts = split_block_mask(mask, 2, "kwargs['block_mask']")
    >>> [tuple(p.kv_num_blocks.shape) for p in parts]
    [(2, 1, 4), (2, 1, 4)]
    >>> b, h, q, kv = torch.tensor(1), torch.tensor(0), torch.tensor(40), torch.tensor(20)
    >>> bool(parts[1].mask_mod(b, h, q, kv)) == bool(same_doc(b + 2, h, q, kv))   # its row 1 is the batch's row 3
    True
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_block_mask", "split_block_mask"]


def is_block_mask(value: Any) -> bool:
    """Whether ``value`` is a flex attention ``BlockMask`` (read by its type name: flex attention is imported only
    by models that use it)."""
    return type(value).__name__ == "BlockMask" and hasattr(value, "kv_num_blocks") and hasattr(value, "mask_mod")


class _Shifted:
    """A ``mask_mod`` that reads row ``b + offset`` of the batch it was made for."""

    def __init__(self, mask_mod: Any, offset: int) -> None:
        self.mask_mod, self.offset = mask_mod, offset

    def __call__(self, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return self.mask_mod(b + self.offset, h, q_idx, kv_idx)


def split_block_mask(mask: Any, n: int, where: str) -> list[Any]:
    """``mask`` for each of ``n`` equal micro-batches of its batch rows (itself ``n`` times when made for one row)."""
    batch = int(mask.kv_num_blocks.shape[0])
    if batch == 1:
        return [mask] * n
    if batch % n:
        raise ValueError(
            f"{where} is a flex attention BlockMask for a batch of {batch} rows, which does not split into {n} equal "
            f"micro-batches. Build it for the batch the model gets (a multiple of {n} rows), or with B=1 when every "
            "row has the same mask (it then broadcasts to every micro-batch)"
        )
    rows = batch // n
    parts = []
    for i in range(n):
        part = mask[i * rows:(i + 1) * rows]
        part.mask_mod = _Shifted(mask.mask_mod, i * rows) if i else mask.mask_mod
        parts.append(part)
    return parts

"""Next-token choice on the last stage: greedy, or sampling with temperature / top-k / top-p as ``model.generate``.

The processors are applied in Hugging Face's order (temperature, top-k, top-p) to float32
logits, and a sample is one ``torch.multinomial`` draw per row, so with the same seed the random
stream is consumed exactly as ``model.generate(do_sample=True)`` consumes it on the whole batch.

    >>> logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    >>> Picker(do_sample=False).pick(logits).tolist()
    [1, 0]
    >>> a = Picker(do_sample=True, top_k=2, generator=torch.Generator().manual_seed(0)).pick(logits)
    >>> b = Picker(do_sample=True, top_k=2, generator=torch.Generator().manual_seed(0)).pick(logits)
    >>> torch.equal(a, b)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Picker"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Picker:
    """How the last stage turns logits ``[b, vocab]`` into next tokens ``[b]``."""

    do_sample: bool
    """Sample (True) or take the argmax (False)."""
    temperature: float = 1.0
    """Logits are divided by this before sampling (1.0: unchanged)."""
    top_k: int = 0
    """Keep only the ``top_k`` largest logits before sampling (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (1.0: all)."""
    generator: torch.Generator | None = None
    """Random stream for sampling (``None``: torch's default generator, as ``model.generate`` uses)."""

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row of float32 ``logits`` ``[b, vocab]``."""
        if not self.do_sample:
            return torch.argmax(logits, dim=-1)
        scores = logits
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            k = min(self.top_k, scores.size(-1))
            kth = torch.topk(scores, k)[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - self.top_p)
            drop[..., -1:] = False  # keep at least one token
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)

    def skip(self, rows: int, vocab: int, device: torch.device) -> None:
        """Use up the random numbers a draw for ``rows`` finished rows takes (``model.generate`` still samples them).

            >>> g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
            >>> both = torch.multinomial(torch.full((2, 5), 0.2), 1, generator=g1)[1]
            >>> p = Picker(do_sample=True, generator=g2); p.skip(1, 5, torch.device("cpu"))
            >>> torch.equal(torch.multinomial(torch.full((1, 5), 0.2), 1, generator=g2)[0], both)
            True
        """
        if self.do_sample and rows > 0:
            torch.multinomial(torch.ones(rows, vocab, device=device), num_samples=1, generator=self.generator)

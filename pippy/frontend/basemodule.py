"""The base module of a Hugging Face style model: the child that holds its embeddings and block list.

``model.base_model`` names it for most models; where ``base_model_prefix`` names no child (Llama 4's and
Mllama's text models: prefix ``language_model``, child ``model``), ``base_model`` is the model itself, and
the base is found by the child that holds a block list.

    >>> from torch import nn
    >>> class ForCausalLM(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.model = nn.Module(); self.model.layers = nn.ModuleList([nn.Linear(2, 2)])
    ...         self.lm_head = nn.Linear(2, 2)
    ...     @property
    ...     def base_model(self):  # transformers: getattr(self, self.base_model_prefix, self)
    ...         return self
    >>> lm = ForCausalLM()
    >>> base_module(lm) is lm.model, base_module(nn.Linear(2, 2))
    (True, None)
"""

from __future__ import annotations

from torch import nn

__all__ = ["base_module"]


def base_module(model: nn.Module) -> nn.Module | None:
    """The base module (embeddings, layer list, final norm): ``model.base_model`` when it is another module, else
    the child ``model`` or the only child that holds a non-empty ``nn.ModuleList``; ``None`` when there is none."""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return base
    holders = {n: m for n, m in model.named_children()
               if any(isinstance(c, nn.ModuleList) and len(c) > 0 for c in m.children())}
    if "model" in holders:
        return holders["model"]
    return next(iter(holders.values())) if len(holders) == 1 else None

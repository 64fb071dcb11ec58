"""Split helpers for Hugging Face style models: find the repeated blocks, cut into equal layer groups.

Works on any ``nn.Module``; nothing here imports transformers. The repeated blocks of a model are
the elements of its ``nn.ModuleList`` containers whose elements all share one class (GPT-2's
``transformer.h``, BERT's ``bert.encoder.layer``, T5's ``encoder.block`` and ``decoder.block``).

With transformers (not needed here)::

    model = GPT2LMHeadModel(GPT2Config(n_layer=4))
    layer_names(model)[:2]  # ['transformer.h.0', 'transformer.h.1']
    pipe = pippy.pipeline(model, 4, (ids,), split_spec=split_spec_equal_layers(model, 2))

Any model with a block list works the same way:

    >>> import torch, pippy
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.h = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4))
    ...     def forward(self, x):
    ...         for block in self.h:
    ...             x = torch.tanh(block(x))
    ...         return x
    >>> net = Net()
    >>> pipe = pippy.pipeline(net, 2, (torch.randn(4, 4),), split_spec=split_spec_equal_layers(net, 2))
    >>> split_spec_equal_layers(net, 2)
    {'h.1': <SplitPoint.END: 'end'>}
    >>> [sorted({k.rsplit(".", 1)[0] for k in pipe.get_stage_module(s).state_dict()}) for s in range(2)]
    [['h.0', 'h.1'], ['h.2', 'h.3']]
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pippy.frontend.trace import SplitPoint

__all__ = ["layer_names", "split_spec_equal_layers"]


def _is_block_list(mod: nn.Module) -> bool:
    if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
        return False
    kinds = {type(m) for m in mod}
    distinct = {id(m) for m in mod}
    return len(kinds) == 1 and len(distinct) == len(mod) and sum(1 for _ in mod[0].parameters()) > 0


def layer_names(model: nn.Module) -> list[str]:
    """FQNs of the model's repeated blocks, in registration (usually execution) order.

    A block list is an ``nn.ModuleList`` of at least two distinct modules of one class that hold
    parameters; nested lists inside a block (e.g. T5's ``layer`` inside each ``block``) are skipped.
    Shared layers called several times (ALBERT) are not listed, since one module cannot sit in two
    stages: split such models at other module names.

        >>> import torch
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
        >>> layer_names(torch.nn.ModuleDict({"h": blocks}))
        ['h.0', 'h.1', 'h.2']
    """
    out: list[str] = []
    taken: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        if _is_block_list(mod):
            taken.append(name)
            out.extend(f"{name}.{i}" if name else str(i) for i in range(len(mod)))
    return out


def split_spec_equal_layers(
    model: nn.Module, n_stages: int, layers: Sequence[str] | str | None = None
) -> dict[str, SplitPoint]:
    """A ``split_spec`` giving ``n_stages`` stages of (nearly) equal layer count.

    ``layers`` is the ordered list of module names to balance over (default: :func:`layer_names`),
    or the name of one ``ModuleList``. Embeddings go with the first group and heads with the last;
    when the count does not divide evenly the earlier stages get one layer more.

        >>> import torch
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
        >>> split_spec_equal_layers(torch.nn.ModuleDict({"h": blocks}), 2)
        {'h.1': <SplitPoint.END: 'end'>}
    """
    if not isinstance(n_stages, int) or n_stages < 1:
        raise ValueError(f"n_stages must be a positive int, got {n_stages!r}")
    if isinstance(layers, str):
        try:
            container = model.get_submodule(layers)
        except AttributeError:
            raise ValueError(f"{layers!r} names no submodule of {type(model).__name__}") from None
        names = [f"{layers}.{k}" for k, _ in container.named_children()]
    elif layers is None:
        names = layer_names(model)
    else:
        names = list(layers)
        for n in names:
            try:
                model.get_submodule(n)
            except AttributeError:
                raise ValueError(f"{n!r} names no submodule of {type(model).__name__}") from None
    if not names:
        raise ValueError(
            f"found no repeated blocks in {type(model).__name__}; pass layers=[module names in forward order] "
            "(e.g. from model.named_modules())"
        )
    if n_stages > len(names):
        raise ValueError(f"cannot make {n_stages} stages from {len(names)} layers ({names[0]} .. {names[-1]})")
    base, extra = divmod(len(names), n_stages)
    spec: dict[str, SplitPoint] = {}
    end = 0
    for s in range(n_stages - 1):
        end += base + (1 if s < extra else 0)
        spec[names[end - 1]] = SplitPoint.END
    return spec

"""Stage tensors beyond what the stage graphs read: never-read parameters and buffers, and buffer persistence.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> stage = torch.nn.Module(); stage.add_module("0", net[0])   # a stage that reads only net[0]
    >>> place_unread(net, [stage])
    ['1.weight', '1.bias']
"""

from __future__ import annotations

from torch import nn

__all__ = ["ensure_path", "match_persistence", "place_unread"]


def place_unread(gm: nn.Module, stages: list[nn.Module]) -> list[str]:
    """Give each parameter and buffer that no stage reads to the stage holding its nearest relative; returns their names.

    A traced forward may never read some tensors (a decoder's cross-attention run without encoder
    states, an embedding used only with an optional input). They still belong to the model: its
    state dict, its optimizer and its checkpoints. Each goes, unread, to the stage whose tensor
    names share the longest dotted prefix with its own (stage 0 when none do); its grad stays None,
    as in the plain model.

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> stage = torch.nn.Module(); stage.add_module("0", net[0])
        >>> place_unread(net, [stage]), sorted(stage.state_dict())
        (['1.weight', '1.bias'], ['0.bias', '0.weight', '1.bias', '1.weight'])
    """
    held = [{n for n, _ in m.named_parameters(remove_duplicate=False)} | {n for n, _ in m.named_buffers()} for m in stages]
    held_ids = {id(t) for m in stages for t in [*m.parameters(), *m.buffers()]}
    placed: list[str] = []
    named = [(n, t, True) for n, t in gm.named_parameters(remove_duplicate=False)]
    named += [(n, t, False) for n, t in gm.named_buffers(remove_duplicate=False)]
    placed_at: dict[int, int] = {}  # tensor id -> the stage given it here (its aliases go there too)
    for name, tensor, is_param in named:
        if any(name in h for h in held) or (id(tensor) in held_ids and id(tensor) not in placed_at):
            continue  # held, or an alias of a held tensor (a tied weight the pipe transmits)
        parts = name.split(".")
        best, best_len = placed_at.get(id(tensor), 0), -1
        for s, h in enumerate(held):
            common = max((_common_prefix(parts, other.split(".")) for other in h), default=-1)
            if common > best_len and id(tensor) not in placed_at:
                best, best_len = s, common
        owner, leaf = ensure_path(stages[best], parts[:-1]), parts[-1]
        if is_param:
            owner.register_parameter(leaf, tensor)
        else:
            source = gm.get_submodule(".".join(parts[:-1]))
            owner.register_buffer(leaf, tensor, persistent=leaf not in source._non_persistent_buffers_set)
        held[best].add(name)
        held_ids.add(id(tensor))
        placed_at[id(tensor)] = best
        placed.append(name)
    return placed


def match_persistence(stages: list[nn.Module], persistent: set[str]) -> None:
    """Make every stage buffer whose FQN is not in ``persistent`` (the model's state-dict keys) non-persistent.

    Tracing turns non-persistent buffers (rotary ``inv_freq``) and tensor constants into plain
    buffers; without this, stage state dicts would hold keys the model's own state dict does not.

        >>> import torch
        >>> stage = torch.nn.Module(); stage.register_buffer("inv_freq", torch.ones(2))
        >>> match_persistence([stage], set()); list(stage.state_dict())
        []
    """
    for stage in stages:
        for name, _ in list(stage.named_buffers(remove_duplicate=False)):
            if name not in persistent:
                owner_path, _, leaf = name.rpartition(".")
                stage.get_submodule(owner_path)._non_persistent_buffers_set.add(leaf)


def _common_prefix(a: list[str], b: list[str]) -> int:
    k = 0
    while k < min(len(a), len(b)) - 1 and a[k] == b[k]:
        k += 1
    return k


def ensure_path(root: nn.Module, path: list[str]) -> nn.Module:
    """The submodule of ``root`` at ``path`` (a list of names), creating empty modules where missing.

        >>> root = nn.Module()
        >>> ensure_path(root, ["a", "b"]) is root.get_submodule("a.b")
        True
    """
    mod = root
    for part in path:
        child = mod._modules.get(part)
        if child is None:
            child = nn.Module()
            mod.add_module(part, child)
        mod = child
    return mod

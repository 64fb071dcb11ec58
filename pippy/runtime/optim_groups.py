"""Param-group hyperparameters restored by parameter name: each optimizer group takes its saved group's, never by position.

A checkpoint's param groups list their parameters by FQN. A resumed optimizer may order its groups
differently (another split, another placement of the stages on the ranks), so each of its groups
takes the hyperparameters (``lr``, ``betas``, a scheduler's ``initial_lr``, user keys) of the saved
group that held its parameters; parameters that the saved run trained with different
hyperparameters must not share a group.

    >>> import torch
    >>> a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    >>> opt = torch.optim.SGD([{"params": [b]}, {"params": [a]}], lr=0.5)
    >>> saved = {id(a): ("'a'", {"lr": 0.1, "params": ["a"]}), id(b): ("'b'", {"lr": 0.2, "params": ["b"]})}
    >>> [g["lr"] for g in matched_groups(opt, saved)]
    [0.2, 0.1]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["hyperparameters", "matched_groups", "same_value"]

_NOT_HYPER = ("params", "param_names")
_ABSENT = object()


def hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """A param group without its parameters (``params``, ``param_names``).

        >>> hyperparameters({"lr": 0.1, "params": ["w"], "param_names": ["w"]})
        {'lr': 0.1}
    """
    return {k: v for k, v in group.items() if k not in _NOT_HYPER}


def same_value(a: Any, b: Any) -> bool:
    """Exact equality of two hyperparameter values (tensors by value, tuples and lists element by element).

        >>> same_value(torch.tensor(0.1), torch.tensor(0.1)), same_value((0.9, 0.99), (0.9, 0.98))
        (True, False)
    """
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and bool(torch.equal(a.detach().cpu(), b.detach().cpu())))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _show(v: Any) -> str:
    return f"tensor({v.item()})" if isinstance(v, torch.Tensor) and v.numel() == 1 else repr(v)


def matched_groups(optimizer: torch.optim.Optimizer,
                   saved: Mapping[int, tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per group of ``optimizer``: its own hyperparameters updated with those of the saved groups of its parameters.

    ``saved`` maps ``id(parameter)`` to (a name for messages, the saved group that held it).
    Parameters absent from ``saved`` do not count; a group with none keeps its hyperparameters.
    Raises ``ValueError`` naming the parameters and values when one group's parameters come from
    saved groups with different hyperparameters.

        >>> a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([a, b], lr=0.5)
        >>> matched_groups(opt, {id(a): ("'a'", {"lr": 0.1}), id(b): ("'b'", {"lr": 0.2})})
        Traceback (most recent call last):
        ValueError: optimizer group 0 holds parameters that the checkpoint's optimizer kept in groups with different hyperparameters: lr=0.1 for ['a']; lr=0.2 for ['b']. One group ...
    """
    out: list[dict[str, Any]] = []
    for j, group in enumerate(optimizer.param_groups):
        hits = [saved[id(p)] for p in group["params"] if id(p) in saved]
        mine = hyperparameters(group)
        if hits:
            first = hyperparameters(hits[0][1])
            clash = sorted({k for _, g in hits for k in {*g, *first} if k not in _NOT_HYPER
                            and not same_value(g.get(k, _ABSENT), first.get(k, _ABSENT))})
            if clash:
                sets: list[tuple[list[Any], list[str]]] = []
                for name, g in hits:
                    vals = [g.get(k, _ABSENT) for k in clash]
                    same = next((s for s in sets if all(same_value(x, y) for x, y in zip(s[0], vals))), None)
                    if same is None:
                        sets.append((vals, [name]))
                    else:
                        same[1].append(name)
                shown = "; ".join(
                    " ".join(f"{k}={'(none)' if v is _ABSENT else _show(v)}" for k, v in zip(clash, vals))
                    + f" for [{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}]" for vals, names in sets)
                raise ValueError(
                    f"optimizer group {j} holds parameters that the checkpoint's optimizer kept in groups with different "
                    f"hyperparameters: {shown}. One group cannot take both: build the optimizer with one param group "
                    "per set of hyperparameters (as when the checkpoint was saved), then load again"
                )
            mine.update(first)
        out.append(mine)
    return out

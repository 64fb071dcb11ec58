"""The device a model was traced on, and re-pointing a traced graph's device constants at a stage's device.

``torch.export`` bakes the device of every tensor a model makes into the graph
(``torch.arange(n, device=x.device)`` becomes ``aten.arange(..., device=cpu)``; ``.to()`` and
``_assert_tensor_metadata`` carry it too). A stage built on another device than the trace's
must run those ops on its own device, so :func:`retarget_devices` rewrites exactly the traced
device (and ``meta``), leaving a deliberate op on another device (``.cpu()`` of a CUDA model) alone.

    >>> import torch
    >>> class Pos(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x + torch.arange(x.shape[-1], device=x.device)
    >>> gm = torch.export.export(Pos(), (torch.ones(2, 3),)).module()
    >>> retarget_devices(gm, [torch.device("cpu")], "meta")
    True
    >>> gm(torch.ones(2, 3, device="meta")).device
    device(type='meta')
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

__all__ = ["retarget_devices", "traced_device"]


def traced_device(module: nn.Module, example: Iterable[Any] = ()) -> torch.device | None:
    """The one device ``module``'s tensors are on (else that of the tensors in ``example``); None when several or none.

        >>> traced_device(torch.nn.Linear(2, 2)), traced_device(torch.nn.ReLU(), [torch.ones(1, device="meta")])
        (device(type='cpu'), device(type='meta'))
        >>> print(traced_device(torch.nn.ReLU(), [1.0]))
        None
    """
    for source in ([*module.parameters(), *module.buffers()], list(example)):
        devices = {t.device for t in source if isinstance(t, torch.Tensor)}
        if devices:
            return devices.pop() if len(devices) == 1 else None
    return None


def retarget_devices(module: nn.Module, devices: Iterable[torch.device | str], to: torch.device | str) -> bool:
    """Point every device argument equal to one of ``devices`` in ``module``'s graphs at ``to``; True if any changed.

    Every graph in ``module`` (a :class:`torch.fx.GraphModule`'s, recompiled, or an outlined
    tree's ``InterpreterModule``'s) is rewritten. A device written without an index (``"cuda"``) matches an indexed one of the same
    type. Device strings are rewritten only as a ``device=`` keyword.

        >>> g = fx.Graph()
        >>> x = g.placeholder("x")
        >>> _ = g.output(g.call_function(torch.ones, (2,), {"device": "cpu"}))
        >>> gm = fx.GraphModule(nn.Module(), g)
        >>> retarget_devices(gm, ["cpu"], "meta"), gm(None).device
        (True, device(type='meta'))
    """
    target = torch.device(to)
    olds = [torch.device(d) for d in devices]
    olds = [d for d in olds if d != target]

    def matches(dev: torch.device) -> bool:
        return any(dev == d or (dev.type == d.type and dev.index is None) for d in olds) and dev != target

    def fix(v: Any, keyword: bool = False) -> Any:
        if isinstance(v, torch.device) and matches(v):
            return target
        if keyword and isinstance(v, str):
            try:
                return target if matches(torch.device(v)) else v
            except RuntimeError:
                return v
        if isinstance(v, tuple | list):
            return type(v)(fix(x) for x in v)
        if isinstance(v, dict):
            return {k: fix(x, k == "device") for k, x in v.items()}
        return v

    changed = False
    if not olds:
        return changed
    for gm in module.modules():
        graph = getattr(gm, "graph", None)
        if not isinstance(graph, fx.Graph):
            continue
        touched = False
        for node in graph.nodes:
            args, kwargs = fix(node.args), {k: fix(v, k == "device") for k, v in node.kwargs.items()}
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                touched = True
        if touched and isinstance(gm, fx.GraphModule):
            gm.recompile()
        changed = changed or touched
    return changed

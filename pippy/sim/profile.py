"""Measure a Pipe's per-stage costs on this machine and return a CostModel for the simulator.

    >>> # pipe = pipeline(model, 4, example_args=(x,)); profile(pipe, (x,)).to_json("costs.json")

What is measured, per stage, on one micro-batch of the example (median of ``repeats`` runs after
one warm-up): ``f`` the forward; ``i`` a backward that only asks for the gradients of the stage's
inputs; ``w = B - i`` where ``B`` is a full backward (inputs and parameters) — the share that the
weight gradient adds; ``act_bytes`` the bytes autograd saves for backward (each storage once);
``send_bytes`` the bytes of outputs read by other stages; ``static_bytes`` parameters plus their
gradients (optimizer state is not included). Latency and bandwidth are left at 0 / infinite: set
them for your interconnect.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pippy.sim.cost import CostModel, StageCost

__all__ = ["profile"]

_USER = -1


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def _tensors(xs: Any) -> list[torch.Tensor]:
    if isinstance(xs, torch.Tensor):
        return [xs]
    if isinstance(xs, (list, tuple)):
        return [t for x in xs for t in _tensors(x)]
    return []


def _nbytes(t: torch.Tensor) -> int:
    return int(t.numel() * t.element_size())


def _run_forward(pipe: Any, s: int, inputs: list[Any]) -> tuple[Any, ...]:
    if hasattr(pipe, "run_stage_forward"):
        out = pipe.run_stage_forward(s, inputs)
    else:
        out = pipe.stage_infos[s].module(*inputs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _first_microbatch(pipe: Any, example_args: Sequence[Any], example_kwargs: dict[str, Any]) -> list[Any]:
    n = int(getattr(pipe, "num_chunks", 1) or 1)
    if hasattr(pipe, "split_inputs"):
        return list(pipe.split_inputs(tuple(example_args), dict(example_kwargs), n)[0])
    return list(example_args) + list(example_kwargs.values())


def _stage_cost(pipe: Any, s: int, raw: list[Any], repeats: int) -> tuple[StageCost, tuple[Any, ...]]:
    """Measure stage ``s`` on inputs ``raw``; returns its cost and its outputs."""
    info = pipe.stage_infos[s]
    grad_inputs = [v for v in raw if isinstance(v, torch.Tensor) and v.requires_grad]
    params = [p for p in info.module.parameters() if p.requires_grad] if hasattr(info.module, "parameters") else []
    f = _median_time(lambda: _run_forward(pipe, s, raw), repeats)
    saved: dict[Any, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            key: Any = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            key = id(t)
        saved[key] = max(saved.get(key, 0), _nbytes(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _run_forward(pipe, s, raw)
    diff = [o for o in _tensors(out) if o.requires_grad]
    grads = [torch.ones_like(o) for o in diff]

    def backward(wrt: list[torch.Tensor]) -> Callable[[], Any]:
        return lambda: torch.autograd.grad(diff, wrt, grads, retain_graph=True, allow_unused=True)

    full = grad_inputs + params
    b = _median_time(backward(full), repeats) if diff and full else 0.0
    i = _median_time(backward(grad_inputs), repeats) if diff and grad_inputs else 0.0
    consumers = getattr(info, "consumers", None) or []
    sent = 0
    for j, o in enumerate(out):
        readers = consumers[j] if j < len(consumers) else []
        if isinstance(o, torch.Tensor) and any(c != s for c, _ in readers):
            sent += _nbytes(o)
    cost = StageCost(
        f=f, i=i, w=max(0.0, b - i), act_bytes=float(sum(saved.values())),
        send_bytes=float(sent), static_bytes=float(2 * sum(_nbytes(p) for p in params)),
    )
    return cost, out


def profile(
    pipe: Any,
    example_args: Sequence[Any],
    example_kwargs: dict[str, Any] | None = None,
    *,
    repeats: int = 3,
) -> CostModel:
    """Time each stage of ``pipe`` on one micro-batch of the example and size its tensors.

    ``pipe`` needs ``num_stages`` and ``stage_infos[s]`` with ``inputs`` (refs with
    ``src_stage``/``index``; ``src_stage == -1`` is a user input), ``outputs`` and ``module``
    (or a ``run_stage_forward(s, inputs)`` method). The returned model's ``microbatches`` is the
    pipe's ``num_chunks``, so ``CostModel.for_microbatches`` can rescale it.

        >>> # costs = profile(pipe, (x,), repeats=5); costs.to_json("costs.json")
    """
    infos = getattr(pipe, "stage_infos", None)
    if infos is None or not hasattr(pipe, "num_stages"):
        raise TypeError("profile() needs a Pipe with num_stages and stage_infos (see pippy.pipeline)")
    user = _first_microbatch(pipe, example_args, example_kwargs or {})
    outputs: dict[int, tuple[Any, ...]] = {}
    stages: list[StageCost] = []
    for s in range(int(pipe.num_stages)):
        raw: list[Any] = []
        for ref in infos[s].inputs:
            v = user[ref.index] if ref.src_stage == _USER else outputs[ref.src_stage][ref.index]
            if isinstance(v, torch.Tensor):
                v = v.detach()
                if ref.src_stage != _USER and v.is_floating_point():
                    v.requires_grad_(True)
            raw.append(v)
        cost, out = _stage_cost(pipe, s, raw, repeats)
        outputs[s] = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out)
        stages.append(cost)
    return CostModel(stages=stages, microbatches=int(getattr(pipe, "num_chunks", 1) or 1))

"""Measure a Pipe's per-stage costs and the rank-to-rank link, and return a CostModel for the simulator.

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> x, y = torch.randn(4, 8), torch.randn(4, 1)
    >>> pipe = pipeline(net, 2, example_args=(x,), split_spec={"1": SplitPoint.END})
    >>> costs = profile(pipe, (x,), loss_fn=torch.nn.functional.mse_loss, target=y, repeats=1, warmup=0)
    >>> costs.num_stages, costs.microbatches, all(c.f > 0 and c.b > 0 for c in costs.stages)
    (2, 2, True)

Each stage is timed through the runtime's own stage (any :class:`ProfiledStage`: what
``pipe.build_stage`` returns, built here without importing the runtime), so
the profile measures exactly what the executor runs: ``F`` is ``stage.forward`` (plus the loss on
the last stage), ``B`` is ``stage.backward`` and, for split-backward schedules, ``I`` and ``W``
are ``stage.backward_input`` / ``stage.backward_weight`` after a forward with weight-grad taps.
Times are medians over ``repeats`` runs on the first micro-batch after ``warmup`` runs, with
``torch.set_num_threads(threads)`` during the measurement (use the thread count of the run).

Which times go into the model: ``f`` and ``fused_b`` are the plain forward and the full
backward (one autograd pass, what GPipe/1F1B and every fused ``I``+``W`` run); ``split_f``,
``i`` and ``w`` are the forward with weight-grad taps and the split backward of zero-bubble
schedules. The simulator picks per stage: a stage the schedule splits forwards in ``split_f``.

Sizes: ``act_bytes`` the bytes autograd saves in a forward (each storage once); ``send_bytes``
the outputs read by stages on other ranks and ``grad_bytes`` those of them that carry gradients;
``static_bytes`` parameters plus their gradients (no optimizer state). :func:`measure_link` times
a gloo/NCCL ping-pong for ``latency`` and ``bandwidth``; :func:`profile_ranks` does it all under
a process group, each rank timing its own stages while the others time theirs, as in the run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from pippy.frontend.costs import value_nbytes
from pippy.frontend.split import USER, StageInfo
from pippy.sim.cost import CostModel, StageCost
from pippy.sim.memory import SavedBytes
from pippy.sim.profile_link import agree_costs, measure_link, median_costs, split_mesh

__all__ = ["Profilable", "ProfiledStage", "measure_link", "median_costs", "profile", "profile_ranks"]


class ProfiledStage(Protocol):
    """What the profiler calls on a stage: the runtime stage's per-micro-batch compute."""

    measure_activations: bool
    """Count the bytes each live micro-batch holds (read by :meth:`live_activation_bytes`)."""

    def live_activation_bytes(self) -> int:
        """Bytes the live micro-batches hold, as the runtime counts them."""

    def forward(self, mb: int, inputs: Sequence[Any], *, training: bool, split_backward: bool = False) -> tuple[Any, ...]:
        """Forward of one micro-batch."""

    def set_loss(self, mb: int, loss: torch.Tensor) -> None:
        """Attach the last stage's loss."""

    def backward(self, mb: int, grads: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
        """Full backward (B)."""

    def backward_input(self, mb: int, grads: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
        """Input-gradient backward (I)."""

    def backward_weight(self, mb: int) -> None:
        """Weight-gradient backward (W)."""

    def clear(self) -> None:
        """Drop every micro-batch's state."""

    def parameters(self) -> Iterator[nn.Parameter]:
        """The stage's parameters."""


@runtime_checkable
class Profilable(Protocol):
    """What the profiler needs of a pipe: its stages and data flow, and a way to build a stage (``pippy.Pipe``)."""

    stage_infos: list[StageInfo]
    num_chunks: int

    @property
    def num_stages(self) -> int:
        """Number of stages."""

    def split_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any], n: int) -> list[list[Any]]:
        """The example batch as ``n`` flat micro-batches."""

    def unflatten_output(self, flat: tuple[Any, ...] | list[Any]) -> Any:
        """The last stage's flat outputs in the model's output structure."""

    def build_stage(self, i: int, device: torch.device | str) -> ProfiledStage:
        """The runtime stage ``i`` on ``device``."""


def _tensors(xs: Any) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(xs) if isinstance(t, torch.Tensor)]


class _Bench:
    """Times one stage the way the executor runs it, on one micro-batch."""

    def __init__(self, pipe: Profilable, s: int, inputs: list[Any], target: Any, loss_fn: Callable[..., Any] | None,
                 device: str | torch.device) -> None:
        self.pipe, self.s = pipe, s
        self.last = s == pipe.num_stages - 1
        self.stage = pipe.build_stage(s, device)
        self.inputs, self.target, self.loss_fn = inputs, target, loss_fn
        info = pipe.stage_infos[s]
        with torch.no_grad():
            outs = self.stage.forward(0, inputs, training=False)
        # the gradient a consumer would send back for each output (None: no gradient flows)
        self.grads: list[torch.Tensor | None] = [
            torch.randn_like(o) if isinstance(o, torch.Tensor) and meta.requires_grad and o.is_floating_point() else None
            for o, meta in zip(outs, info.outputs)
        ]
        self.outputs = outs

    def forward(self, split: bool) -> None:
        outs = self.stage.forward(0, self.inputs, training=True, split_backward=split)
        if self.last:
            out = self.pipe.unflatten_output(outs)
            if self.loss_fn is not None and self.target is not None:
                loss = self.loss_fn(out, self.target)
            else:  # no loss given: backward from the sum of the outputs
                loss = sum((t.float().sum() for t in _tensors(out) if t.requires_grad), torch.zeros(()))
            self.stage.set_loss(0, loss.reshape(()))

    def backward_grads(self) -> list[torch.Tensor | None] | None:
        return None if self.last else self.grads

    def times(self, split: bool) -> dict[str, float]:
        """One forward + backward; seconds per phase."""
        t0 = time.perf_counter()
        self.forward(split)
        t1 = time.perf_counter()
        if split:
            self.stage.backward_input(0, self.backward_grads())
            t2 = time.perf_counter()
            self.stage.backward_weight(0)
            t3 = time.perf_counter()
            return {"F": t1 - t0, "I": t2 - t1, "W": t3 - t2}
        self.stage.backward(0, self.backward_grads())
        return {"F": t1 - t0, "B": time.perf_counter() - t1}

    def act_bytes(self) -> float:
        """Bytes autograd saves in one forward (each storage once, parameters left out), as the runtime counts them."""
        with SavedBytes(skip=self.stage.parameters()) as counter:
            self.forward(False)  # the graph keeps every counted storage alive until clear(): no address reuse
        self.stage.clear()
        return float(counter.total)

    def w_act_bytes(self) -> float:
        """Bytes the stage holds between a split backward's I and its W, as the runtime counts them."""
        was, self.stage.measure_activations = self.stage.measure_activations, True
        try:
            self.forward(True)
            self.stage.backward_input(0, self.backward_grads())
            return float(self.stage.live_activation_bytes())
        finally:
            self.stage.clear()
            self.stage.measure_activations = was


def _ignored_split_backward(value: bool | None) -> None:
    if value is not None:
        import warnings

        warnings.warn("profile(split_backward=...) is ignored: every stage is now timed both ways (F + B, and "
                      "tapped F + I + W); the simulator picks per stage", DeprecationWarning, stacklevel=3)


def _stage_inputs(pipe: Profilable, s: int, user: list[Any], outputs: dict[int, tuple[Any, ...]]) -> list[Any]:
    raw: list[Any] = []
    for ref in pipe.stage_infos[s].inputs:
        v = user[ref.index] if ref.src_stage == USER else outputs[ref.src_stage][ref.index]
        raw.append(v.detach() if isinstance(v, torch.Tensor) else v)
    return raw


def _measure(bench: _Bench, repeats: int, warmup: int, place: Sequence[int] | None) -> StageCost:
    modes = [False, True]
    runs: dict[bool, list[dict[str, float]]] = {m: [] for m in modes}
    for k in range(warmup + max(1, repeats)):
        for m in modes:  # interleaved, so that both modes see the same machine conditions
            t = bench.times(m)
            if k >= warmup:
                runs[m].append(t)

    def med(m: bool, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[m]))

    info = bench.pipe.stage_infos[bench.s]
    sent = grad = 0
    for j, o in enumerate(bench.outputs):
        readers = info.consumers[j] if j < len(info.consumers) else []
        remote = any((place[c] != place[bench.s]) if place else c != bench.s for c, _ in readers)
        if isinstance(o, torch.Tensor) and remote:
            sent += value_nbytes(o)
            grad += value_nbytes(o) if bench.grads[j] is not None else 0
    params = [p for p in bench.stage.parameters() if p.requires_grad]
    return StageCost(f=med(False, "F"), i=med(True, "I"), w=med(True, "W"), fused_b=med(False, "B"),
                     split_f=med(True, "F"), act_bytes=bench.act_bytes(),
                     # a stage whose inputs need no gradient never splits its backward (a B at each W's place)
                     w_act_bytes=bench.w_act_bytes() if any(m.requires_grad for m in info.input_meta) else None,
                     send_bytes=float(sent),
                     grad_bytes=float(grad), static_bytes=float(2 * sum(value_nbytes(p) for p in params)))


def _profile_stages(pipe: Profilable, example_args: Sequence[Any], example_kwargs: dict[str, Any] | None, *,
                    which: Iterable[int], loss_fn: Callable[..., Any] | None, target: Any, repeats: int,
                    warmup: int, threads: int | None, device: str | torch.device, place: Sequence[int] | None = None) -> dict[int, StageCost]:
    from pippy.microbatch import split_value

    if not isinstance(pipe, Profilable):
        raise TypeError(
            f"profile() needs a pippy.Pipe (from pippy.pipeline), got {type(pipe).__name__}: it must have stage_infos, "
            "num_stages, num_chunks, split_inputs, unflatten_output and build_stage"
        )
    n = max(1, pipe.num_chunks)
    user = list(pipe.split_inputs(tuple(example_args), dict(example_kwargs or {}), n)[0])
    tgt = split_value(target, n)[0] if target is not None else None
    want = set(which)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        outputs: dict[int, tuple[Any, ...]] = {}
        costs: dict[int, StageCost] = {}
        for s in range(int(pipe.num_stages)):
            if s > max(want, default=-1):
                break
            bench = _Bench(pipe, s, _stage_inputs(pipe, s, user, outputs), tgt, loss_fn, device)
            outputs[s] = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in bench.outputs)
            if s in want:
                costs[s] = _measure(bench, repeats, warmup, place)
        return costs
    finally:
        torch.set_num_threads(old_threads)


def profile(
    pipe: Profilable,
    example_args: Sequence[Any],
    example_kwargs: dict[str, Any] | None = None,
    *,
    loss_fn: Callable[..., Any] | None = None,
    target: Any = None,
    repeats: int = 5,
    warmup: int = 2,
    threads: int | None = None,
    split_backward: bool | None = None,
    device: str | torch.device = "cpu",
) -> CostModel:
    """Time each stage of ``pipe`` on one micro-batch of the example, in this process, and size its tensors.

    ``loss_fn`` and ``target`` (the full-batch target) make the last stage's F and backward
    include the loss as in ``step()``. ``threads`` sets torch's thread count while timing. Each
    stage is timed both ways (full and split backward; see the module docstring), so the old
    ``split_backward`` option is ignored (with a DeprecationWarning). Latency and bandwidth stay 0 / infinite: set them, or
    use :func:`profile_ranks`. The model's ``microbatches`` is the pipe's ``num_chunks``.

    The module docstring runs it on a small model; ``costs.to_json("c.json")`` saves the result
    for ``python -m pippy simulate --costs c.json``.
    """
    _ignored_split_backward(split_backward)
    n = pipe.num_stages
    got = _profile_stages(pipe, example_args, example_kwargs, which=range(n), loss_fn=loss_fn, target=target,
                          repeats=repeats, warmup=warmup, threads=threads, device=device)
    return CostModel(stages=[got[s] for s in range(n)], microbatches=max(1, pipe.num_chunks))


def profile_ranks(
    pipe: Profilable,
    example_args: Sequence[Any],
    placement: Sequence[int],
    example_kwargs: dict[str, Any] | None = None,
    *,
    group: Any = None,
    dp_group: Any = None,
    loss_fn: Callable[..., Any] | None = None,
    target: Any = None,
    repeats: int = 5,
    warmup: int = 2,
    threads: int | None = None,
    split_backward: bool | None = None,
    device: str | torch.device = "cpu",
) -> CostModel:
    """Collective :func:`profile`: each rank times the stages ``placement`` puts on it, concurrently.

    Every rank of ``group`` needs the example (and the target, for the last stage's loss); all
    return the same model, with ``latency`` and ``bandwidth`` from :func:`measure_link` between
    the ranks of stages 0 and 1 (when they differ). ``send_bytes`` count only outputs read on
    another rank.

    Under data parallelism, ``group=mesh`` (a ``DeviceMesh`` with a ``"pp"`` dimension: the
    pipeline; every other dimension: DP) or ``dp_group=`` (a process group or ``DeviceMesh``)
    makes every DP replica return the same model: the median of the replicas' own profiles
    (:func:`pippy.sim.profile_link.agree_costs`), as ``costs=`` must be the same on every DP rank.

    Under torchrun, on every rank::

        costs = profile_ranks(pipe, (x,), Schedule1F1B.placement(2), loss_fn=F.mse_loss, target=y, threads=1)
    """
    import torch.distributed as dist

    _ignored_split_backward(split_backward)
    group, mesh_dp = split_mesh(group)
    me = dist.get_rank(group)
    mine = [s for s, r in enumerate(placement) if r == me]
    got = _profile_stages(pipe, example_args, example_kwargs, which=mine, loss_fn=loss_fn, target=target,
                          repeats=repeats, warmup=warmup, threads=threads, device=device, place=placement)
    world = dist.get_world_size(group)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, got, group=group)
    merged = {s: c for part in parts for s, c in part.items()}
    a, b = placement[0], next((r for r in placement if r != placement[0]), placement[0])
    lat, bw = measure_link(group, ranks=(a, b)) if a != b else (0.0, float("inf"))
    n = pipe.num_stages
    costs = CostModel(stages=[merged[s] for s in range(n)], latency=lat, bandwidth=bw,
                      microbatches=max(1, pipe.num_chunks))
    return agree_costs(costs, dp_group if dp_group is not None else mesh_dp)

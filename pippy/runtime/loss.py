"""The loss of a pipeline step: the user's loss_fn (or the model's own loss) on the last stage, with clear errors.

    >>> import torch
    >>> describe(torch.zeros(2, 3, dtype=torch.float64)), describe({"logits": 1})
    ('float64[2, 3]', "dict with keys ['logits'] and no 'loss' key")
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.nn import _reduction as _Reduction
from torch.utils import _pytree as pytree

from pippy.frontend.notice import warn_user
from pippy.frontend.reduction import graph_reduction, model_reduction
from pippy.microbatch import Replicate, TensorChunkSpec, merge_chunks, split_leaves, split_value
from pippy.runtime.lossadvice import loss_fn_fix, loss_value_fix
from pippy.runtime.stageerror import StageError

__all__ = ["choose_reduction", "describe", "graph_reduction", "infer_reduction", "loss_index", "measure_reduction",
           "model_reduction", "named_reduction", "probe_reduction", "step_loss", "target_spec"]


def step_loss(where: str, mb: int, out: Any, loss_fn: Callable[..., torch.Tensor] | None, target: Any, has_target: bool,
              check_finite: bool = False, backward: bool = True) -> torch.Tensor:
    """The unscaled scalar loss of micro-batch ``mb`` from the last stage's output, or a clear error.

    ``where`` names rank, stage, micro-batch and action for messages. With ``loss_fn`` it is
    ``loss_fn(out, target)``; without, the model's own output must be a scalar or carry a
    ``loss`` field. ``check_finite`` raises on NaN or infinity (one host sync). ``backward=False``
    (``eval(x, target=y)``) needs no gradient.

        >>> out = torch.ones(2, 3, requires_grad=True)
        >>> step_loss("rank 1, stage 1", 0, out, torch.nn.functional.mse_loss, torch.zeros(2, 3), True)
        tensor(1., grad_fn=<ViewBackward0>)
        >>> step_loss("rank 1, stage 1", 0, {"logits": out}, None, None, False)
        Traceback (most recent call last):
        ...
        pippy.runtime.stage.StageError: rank 1, stage 1: step() needs a scalar loss: ... got dict with keys ['logits'] and no 'loss' key
    """
    if loss_fn is not None:
        if not has_target:
            raise StageError(f"{where}: loss_fn is set but no target was given; call step(..., target=y) here")
        try:
            loss = loss_fn(out, target)
        except Exception as exc:  # the user's function: say where, with what, and what it must accept
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            arity = isinstance(exc, TypeError) and "positional argument" in first
            fit = re.search(r"size|shape|dimension|dtype|broadcast|match|expected|not subscriptable|has no attribute",
                            first, re.IGNORECASE)
            fix = ("loss_fn must accept two positional arguments, def loss_fn(output, target)" if arity
                   else loss_fn_fix(out, target, fits=bool(fit)))
            raise StageError(
                f"{where}: loss_fn(output, target) raised {type(exc).__name__}: {first}. It got output "
                f"{describe(out)}, target {describe(target)} (this micro-batch's slice of step(target=...)). "
                f"How to fix: {fix}"
            ) from exc
    else:
        loss = _loss_from_output(out)
        if loss is None:
            raise StageError(
                f"{where}: step() needs a scalar loss: pass loss_fn=... to the schedule, or make the model "
                f"return a 0-dim tensor (or an output with a 'loss' field); got {describe(out)}"
            )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise StageError(
            f"{where}: loss_fn must return a scalar tensor, got {describe(loss)}; {loss_value_fix(loss)}"
        )
    if backward and not loss.requires_grad and not torch.is_grad_enabled():
        raise StageError(
            f"{where}: step() runs under torch.no_grad() (or inference_mode), so the loss has no gradient to "
            "backpropagate. Call step() outside it, or use the schedule's .eval(...) for a forward-only pass"
        )
    elif backward and not loss.requires_grad:
        raise StageError(
            f"{where}: the loss does not require grad, so there is nothing to backpropagate; check that "
            "loss_fn uses the model output (not a detached copy) and that the last stage has trainable inputs"
        )
    if check_finite and not bool(torch.isfinite(loss.detach()).all()):
        raise StageError(
            f"{where}: the loss of micro-batch {mb} is {loss.item()}; expected a finite number. Lower the "
            "learning rate, clip gradients or check this micro-batch's data (check_finite=True raised this)"
        )
    return loss.reshape(())


def describe(x: Any) -> str:
    """A value, briefly, for messages: ``float64[2, 4]``, ``dict with keys ['logits'] and no 'loss' key``, ``tuple of 2: [...]``."""
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
    if isinstance(x, Mapping):
        keys = list(x)
        extra = "" if "loss" in keys else " and no 'loss' key"
        return f"{type(x).__name__} with keys {keys[:8]}{extra}"
    if isinstance(x, list | tuple):
        inner = ", ".join(describe(v) for v in x[:4]) + (", ..." if len(x) > 4 else "")
        return f"{type(x).__name__} of {len(x)}: [{inner}]"
    return type(x).__name__


def _loss_from_output(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor) and out.dim() == 0:
        return out
    loss = out.get("loss") if hasattr(out, "get") else getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def infer_reduction(loss_fn: Callable[..., Any] | None) -> str | None:
    """How ``loss_fn`` reduces a batch, when it says so: ``"sum"``, ``"mean"``, or None when it cannot tell.

    Read from a ``reduction`` attribute (``nn.MSELoss(reduction="sum")``), a ``functools.partial``
    keyword (:func:`named_reduction`: ``reduction=``, or the legacy ``size_average=`` / ``reduce=``), or the
    default of a ``reduction=`` parameter (``torch.nn.functional.mse_loss``).

        >>> infer_reduction(torch.nn.MSELoss(reduction="sum")), infer_reduction(torch.nn.functional.cross_entropy)
        ('sum', 'mean')
        >>> infer_reduction(lambda out, y: (out - y).pow(2).sum()) is None
        True
    """
    if loss_fn is None:
        return None
    found: Any = getattr(loss_fn, "reduction", None)
    if found is None and isinstance(loss_fn, functools.partial):
        found = named_reduction(loss_fn.keywords) or infer_reduction(loss_fn.func)
    if found is None:
        try:
            param = inspect.signature(loss_fn).parameters.get("reduction")
        except (TypeError, ValueError):
            param = None
        if param is not None and param.default is not inspect.Parameter.empty:
            found = param.default
    return found if found in ("sum", "mean") else None


def named_reduction(kwargs: Mapping[str, Any]) -> Any:
    """The reduction that keyword arguments of a torch loss name: ``reduction=``, or torch's legacy
    ``size_average=`` / ``reduce=`` (which override it); None when they name none.

        >>> named_reduction({"reduction": "sum"}), named_reduction({"size_average": False}), named_reduction({"reduce": False})
        ('sum', 'sum', 'none')
    """
    if kwargs.get("size_average") is not None or kwargs.get("reduce") is not None:
        return _Reduction.legacy_get_string(kwargs.get("size_average"), kwargs.get("reduce"), emit_warning=False)
    return kwargs.get("reduction")


def probe_reduction(loss_fn: Callable[..., torch.Tensor], out: Any, target: Any, loss: torch.Tensor,
                    twice: Callable[[Any, Any], tuple[Any, Any]],
                    halves: Callable[[Any, Any], tuple[Any, Any]] | None = None) -> str | None:
    """How ``loss_fn`` reduces a batch, measured: on one micro-batch twice over (``twice(out, target)`` stacks each
    with itself along its batch dim) a mean keeps the micro-batch's ``loss`` and a sum doubles it. Then, where
    ``halves(out, target)`` splits the micro-batch into two equal halves (``(out1, out2), (target1, target2)``), a
    mean must equal the mean of the halves' losses and a sum their sum, which a root of a mean (RMSE), a max or a
    ratio of sums is not. None when a test fails (also a loss over the batch's pairs, a zero loss) or the loss
    cannot run so; a split that fails only skips that test. It runs without grad and leaves the random state as
    it was.

        >>> twice = lambda o, t: (torch.cat([o, o]), torch.cat([t, t]))
        >>> halves = lambda o, t: (o.chunk(2), t.chunk(2))
        >>> o, t = torch.arange(6.0).view(2, 3), torch.zeros(2, 3)
        >>> fns = [lambda o, t: (o - t).sum(), lambda o, t: (o - t).mean(), lambda o, t: (o - t).pow(2).mean().sqrt()]
        >>> [probe_reduction(f, o, t, f(o, t), twice, halves) for f in fns]
        ['sum', 'mean', None]
    """
    def run(o: Any, t: Any) -> float:
        return float(torch.as_tensor(loss_fn(o, t)).detach().float())

    try:
        one = float(loss.detach().float())
        devices = [loss.device] if loss.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            two = run(*twice(out, target))
            parts: tuple[float, float] | None = None
            try:
                if halves is not None:
                    (o1, o2), (t1, t2) = halves(out, target)
                    parts = (run(o1, t1), run(o2, t2))
            except Exception:  # an odd micro-batch, an output that does not split: no halves test
                parts = None
    except Exception:  # the probe is a guess only: a loss_fn it cannot run that way gets the caller's default
        return None
    if not (math.isfinite(one) and math.isfinite(two)) or one == 0.0:
        return None
    tol = 1e-2 if loss.dtype in (torch.float16, torch.bfloat16) else 1e-4
    ratio = two / one
    found = "mean" if abs(ratio - 1.0) <= tol else "sum" if abs(ratio - 2.0) <= 2 * tol else None
    if found is not None and parts is not None:
        want = sum(parts) / (2 if found == "mean" else 1)
        if not abs(want - one) <= tol * max(abs(one), abs(want)):
            return None
    return found


def loss_index(out_spec: pytree.TreeSpec, out_meta: Sequence[Any]) -> int | None:
    """The flat index of the model's own loss among its outputs: the output itself when it is a scalar, or its
    ``loss`` field (a scalar or all-ones shape); None when it has none. ``out_meta`` holds one entry per flat
    output with a ``shape`` (None for a constant).

        >>> from types import SimpleNamespace as M
        >>> spec = pytree.tree_flatten({"loss": 0, "logits": 0})[1]
        >>> loss_index(spec, [M(shape=()), M(shape=(2, 3))]), loss_index(spec, [M(shape=None), M(shape=(2,))])
        (0, None)
    """
    try:
        out = pytree.tree_unflatten(list(range(len(out_meta))), out_spec)
    except Exception:  # an output structure that cannot be rebuilt from indices: no loss to find
        return None
    field = not isinstance(out, int)
    if field:
        out = out.get("loss") if hasattr(out, "get") else getattr(out, "loss", None)
    if not isinstance(out, int) or not 0 <= out < len(out_meta):
        return None
    shape = out_meta[out].shape
    return out if shape is not None and (len(shape) == 0 or (field and all(d == 1 for d in shape))) else None


def choose_reduction(owner: str, loss_fn: Callable[..., torch.Tensor] | None, pipe: Any, own: int | None,
                     given: str | None, trains: bool) -> tuple[str, bool]:
    """A schedule's loss reduction and whether to measure it on the first micro-batch: ``given``, else read off
    ``loss_fn`` (:func:`infer_reduction`) or the traced graph of the model's own loss (flat output ``own``);
    a ``loss_fn`` that does not say is measured (:func:`measure_reduction`); an own loss that does not say
    gets "mean" and a warning naming ``owner``.

        >>> choose_reduction("ScheduleGPipe", torch.nn.MSELoss(reduction="sum"), None, None, None, True)
        ('sum', False)
        >>> choose_reduction("ScheduleGPipe", lambda out, y: (out - y).abs().sum(), None, None, None, True)
        ('mean', True)
    """
    if given is not None:
        return given, False
    if loss_fn is not None:
        found = infer_reduction(loss_fn)
        return found or "mean", found is None
    found = _own_reduction(pipe, own)
    if found is None and trains:
        _unknown(owner, "the model's own loss", "")
    return found or "mean", False


def measure_reduction(owner: str, loss_fn: Callable[..., torch.Tensor], pipe: Any, target_spec: Any, out: Any,
                      target: Any, loss: torch.Tensor) -> str:
    """``loss_fn``'s reduction measured on one micro-batch's ``out``, ``target`` and ``loss`` (:func:`probe_reduction`,
    stacking the output as ``pipe`` merges it and the target along ``target_spec``); "mean" with a warning naming
    ``owner`` when the measure says neither.
    """
    def halves(o: Any, t: Any) -> tuple[Any, Any]:
        spec = pipe.default_merge_spec(len(pytree.tree_leaves(o)))
        return split_value(o, 2, spec, what="output"), split_value(t, 2, target_spec, what="target")

    found = probe_reduction(loss_fn, out, target, loss,
                            lambda o, t: (pipe.merge_outputs([o, o]), merge_chunks([t, t], target_spec)), halves)
    if found is None:
        _unknown(owner, f"loss_fn {getattr(loss_fn, '__name__', loss_fn)!r}",
                 " (on one micro-batch twice over its value was neither the same nor double, or on the micro-batch's "
                 "two halves it was neither their mean nor their sum, or it raised)")
    return found or "mean"


def _own_reduction(pipe: Any, own: int | None) -> str | None:
    """How the model's own loss (flat output ``own``) reduces the batch: from the whole traced graph when the
    pipe read it there (it sees the micro-batch size a trace baked in), else from the last stage's graph."""
    if own is None:
        return None
    reductions = getattr(pipe, "output_reductions", None)
    if reductions is not None and own < len(reductions) and reductions[own] in ("sum", "mean"):
        return str(reductions[own])
    if getattr(pipe, "traced_training", None) is not None:
        return None  # read off the whole traced graph already, which sees more than the last stage's
    return model_reduction(pipe.stage_infos[-1].module, own)


def _unknown(owner: str, what: str, why: str) -> None:
    warn_user(
        f"{owner}: cannot tell whether {what} sums or averages over the batch{why}, so micro-batch losses are "
        "averaged (loss_reduction='mean'): grads equal a mean-reduced full-batch loss. PiPPy summed them. Pass "
        "loss_reduction='sum' for a sum-reduced loss, or loss_reduction='mean' to silence this. A loss that is "
        "neither a sum nor a mean of per-row terms (a root or log of a mean, a max, a ratio of sums, a product of "
        "batch means) cannot be split into micro-batches: compute it per row, or outside the pipeline."
    )


def target_spec(pipe: Any, target: Any, m: int, given: Any = None) -> Any:
    """How ``target`` splits into ``m`` micro-batches: ``given`` (``target_chunk_spec``) when set. Else a target
    tensor splits along a dim an output merges on (the batch dim of a sequence-first model, or of ``o.T``, see
    ``SplitPipe.output_merge_dims``) when it has the whole batch there and not at dim 0, and every other
    tensor along dim 0, except one with fewer dims than the outputs whose size there is no whole multiple of
    the batch (a ``[4]`` target for ``[8, 4]`` outputs): that one is unbatched, and every micro-batch gets all
    of it, as the plain model's loss broadcasts it; one with as many dims is an error (the plain model's loss
    would not broadcast it either). The batch is each split input's micro-batch size times ``m``.

        >>> import torch
        >>> from pippy import pipeline
        >>> pipe = pipeline(torch.nn.Linear(4, 4), 2, (torch.ones(8, 4),))
        >>> target_spec(pipe, torch.zeros(8, 4), 2), target_spec(pipe, torch.zeros(16), 2)
        (None, None)
        >>> target_spec(pipe, {"y": torch.zeros(8, 4), "w": torch.ones(4)}, 2)
        {'y': None, 'w': Replicate()}
    """
    if given is not None:
        return given
    batches = _batch_sizes(pipe, m)
    moved = _moved_batch(pipe, m)
    out_dims = max((len(o.shape) for o in pipe.stage_infos[-1].outputs if o.shape is not None), default=0)
    if not batches and not moved:
        return None
    leaves, tree = pytree.tree_flatten(target)
    specs: list[Any] = []
    for k, t in enumerate(leaves):
        along = [d for d, batch, full in moved if isinstance(t, torch.Tensor) and t.dim() > d and (
            t.shape[d] == batch if batch else t.dim() <= len(full) and t.shape[d] % m == 0)]
        like = [d for d, _, full in moved if d in along and _shaped_like(t, full)]
        if len(set(along)) == 1 and (t.shape[0] not in {batch for _, batch, _ in moved} or like):
            specs.append(TensorChunkSpec(along[0]))
        elif not isinstance(t, torch.Tensor) or t.dim() == 0 or not batches or any(t.shape[0] % b == 0
                                                                                  for b in batches):
            specs.append(None)
        elif t.dim() < out_dims:
            specs.append(Replicate())
        else:
            raise ValueError(
                f"target leaf {k} has {t.shape[0]} rows along dim 0, but the batch has {min(batches)} ({m} "
                f"micro-batches of {min(batches) // m}); expected one row per batch row (or a whole multiple, as a "
                "flattened token target has). Pass the target of this batch, or target_chunk_spec=Replicate() for "
                "a target that is not batched"
            )
    return pytree.tree_unflatten(specs, tree) if any(s is not None for s in specs) else None


def _moved_batch(pipe: Any, m: int) -> list[tuple[int, int | None, tuple[int | None, ...]]]:
    """``(dim, full batch size, full shape)`` for each output the pipe merges along a dim other than 0; sizes traced
    as varying are None (the rank holding the last stage does not see this step's batch), and then a target
    with no more dims than that output (its leading dims: a ``[seq, batch]`` class target of ``[seq, batch, C]``
    logits) splits along that dim."""
    dims = pipe.output_merge_dims or ()
    outs = pipe.stage_infos[-1].outputs
    if len(dims) != len(outs):
        return []
    found = []
    for d, o in zip(dims, outs):
        if d and o.shape is not None and d < len(o.shape):
            full = tuple(None if k in o.dynamic else int(n) * (m if k == d else 1) for k, n in enumerate(o.shape))
            found.append((d, full[d], full))
    return found


def _shaped_like(t: torch.Tensor, full: tuple[int | None, ...]) -> bool:
    """Whether ``t``'s sizes are the leading sizes of an output's (a ``[seq, batch]`` target of ``[seq, batch, C]``)."""
    return t.dim() <= len(full) and all(n is None or t.shape[k] == n for k, n in enumerate(full[:t.dim()]))


def _batch_sizes(pipe: Any, m: int) -> set[int]:
    """The full batch's size along each split input's split dim (empty when the pipe does not say, or sizes vary)."""
    leaves, in_spec = getattr(pipe, "example_leaves", None), getattr(pipe, "in_spec", None)
    if leaves is None or in_spec is None or getattr(pipe, "input_dims", None) is not None:
        return set()
    try:
        args, kwargs = pytree.tree_unflatten(list(leaves), in_spec)
        split = split_leaves(tuple(args), dict(kwargs), pipe.args_chunk_spec, pipe.kwargs_chunk_spec)
    except Exception:  # a pipe built by hand, with inputs the specs do not describe: split every target as given
        return set()
    return {int(leaf.shape[d]) * m for leaf, d in split if isinstance(leaf.shape[d], int) and leaf.shape[d] > 0}

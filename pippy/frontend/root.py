"""The whole pipe in this process: ``split_gm`` (a root graph calling ``submod_0..N``) and a local run of every stage.

PiPPy users inspect ``pipe.split_gm`` and call the pipe like the model; both work on the
same stage modules the pipeline runs.

    >>> import torch
    >>> from pippy.frontend.tracesplit import trace_and_split
    >>> from pippy.frontend.trace import SplitPoint
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> pipe = trace_and_split(net, 2, (torch.randn(4, 4),), split_spec={"1": SplitPoint.END})
    >>> [name for name, _ in root_module(pipe).named_children()]
    ['submod_0', 'submod_1']
    >>> x = torch.randn(4, 4)
    >>> torch.allclose(run_local(pipe, (x,), {})[0], net(x))
    True
"""

from __future__ import annotations

import inspect
import operator
import warnings
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from pippy.frontend.mutation import written_after
from pippy.frontend.pipe import SplitPipe
from pippy.frontend.split import USER

__all__ = ["bind_to_traced", "root_module", "run_local"]


def root_module(pipe: SplitPipe) -> fx.GraphModule:
    """A GraphModule whose children are the stage modules (``submod_<i>``) and whose graph calls them in order.

    Its inputs are the model's flattened inputs, its outputs the model's flattened outputs.
    """
    root = nn.Module()
    graph = fx.Graph()
    user = [graph.placeholder(f"in{k}") for k in range(len(pipe.example_leaves))]
    produced: dict[tuple[int, int], fx.Node] = {}
    for info in pipe.stage_infos:
        name = f"submod_{info.index}"
        root.add_module(name, pipe.get_stage_module(info.index))
        args = tuple(user[r.index] if r.src_stage == USER else produced[(r.src_stage, r.index)] for r in info.inputs)
        call = graph.call_module(name, args)
        for j in range(len(info.outputs)):
            produced[(info.index, j)] = graph.call_function(operator.getitem, (call, j))
    last = pipe.stage_infos[-1]
    graph.output(tuple(produced[(last.index, j)] for j in range(len(last.outputs))))
    return fx.GraphModule(root, graph, class_name="SplitGraph")


def bind_to_traced(pipe: SplitPipe, args: tuple[Any, ...], kwargs: dict[str, Any],
                   signature: inspect.Signature | None) -> list[Any]:
    """Flatten a call's inputs in the traced order, binding positional/keyword forms through ``signature``.

    A model traced with ``example_kwargs={"y": y}`` may be called ``pipe(x, y)`` or ``pipe(x, y=y)``;
    arguments left out take the forward's defaults.
    """
    n_args = _child(pipe.in_spec, 0).num_children
    kw_keys = list(_child(pipe.in_spec, 1).context or [])
    if len(args) == n_args and sorted(kwargs) == sorted(kw_keys):
        call_args, call_kwargs = tuple(args), dict(kwargs)
    elif signature is not None:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            filled = pipe.fill_constants(tuple(args))  # left-out plain values without a default: the traced ones
            try:
                bound = signature.bind(*filled, **kwargs)
            except TypeError:
                raise TypeError(f"the pipe takes the model's arguments {signature}: {exc}") from None
        given = set(bound.arguments)
        bound.apply_defaults()
        names = list(bound.arguments)
        _refuse_untraced(signature, {k: bound.arguments[k] for k in given}, names[:n_args], kw_keys)
        call_args = tuple(bound.arguments[n] for n in names[:n_args])
        missing = [k for k in kw_keys if k not in bound.arguments]
        if missing:
            raise TypeError(f"the pipe was traced with keyword arguments {kw_keys}; missing {missing}")
        call_kwargs = {k: bound.arguments[k] for k in kw_keys}
    else:
        raise TypeError(
            f"the pipe was traced with {n_args} positional argument(s) and keyword arguments {kw_keys}; got "
            f"{len(args)} positional and {sorted(kwargs)}. Call it with the same arguments as the example."
        )
    leaves, spec = pytree.tree_flatten((call_args, {k: call_kwargs[k] for k in kw_keys}))
    if spec != pipe.in_spec:
        raise TypeError(
            f"input structure differs from the traced example.\n expected: {pipe.in_spec}\n got: {spec}\n"
            "Pass inputs with the same nesting as example_args/example_kwargs."
        )
    for k, (got, ex) in enumerate(zip(leaves, pipe.example_leaves)):
        if not isinstance(ex, torch.Tensor) and not isinstance(got, torch.Tensor) and not _same(got, ex):
            raise ValueError(
                f"input leaf {k} is the constant {got!r} but the pipe was traced with {ex!r}; non-tensor inputs "
                "are baked into the graph, so trace again (pipeline(..., example_args=...)) to change them"
            )
    return leaves


def _refuse_untraced(signature: inspect.Signature, given: dict[str, Any], positional: list[str],
                     kw_keys: list[str]) -> None:
    """Raise when the call sets a ``forward`` argument the trace did not see to other than its default (the traced
    graph would ignore it)."""
    for name in sorted(set(given) - set(positional) - set(kw_keys)):
        param = signature.parameters.get(name)
        if param is None or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or _same(given[name], param.default):
            continue
        raise TypeError(
            f"the pipe was traced without the argument {name!r}, so its value would be ignored (the traced graph "
            f"keeps {name}={param.default!r}); trace with it, e.g. pipeline(..., example_kwargs={{{name!r}: ...}})"
        )


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a is b or a == b)
    except Exception:  # a value whose == does not give one bool: compare by identity only
        return False


def run_local(pipe: SplitPipe, args: tuple[Any, ...], kwargs: dict[str, Any],
              signature: inspect.Signature | None = None) -> tuple[Any, ...]:
    """Run every stage in this process on the given inputs; returns the flat outputs (autograd kept).

    Any batch runs at once, as PiPPy ran the whole graph, when the graph allows it: a batch that is
    a whole number ``n > 1`` of traced micro-batches (along the chunk dims) falls back to running
    micro-batch by micro-batch, as the pipeline does, when running it at once fails or gives
    outputs of other than ``n`` micro-batches' shapes (a graph that bakes in the traced size), when
    the graph divides by a micro-batch's size baked in as a number (``loss.sum() / x.shape[0]``) or returns it
    (``x.shape[0]``: the micro-batches' counts add up), or
    when a stage writes a buffer or an input in place (batch norm's running statistics, which a
    failed attempt would have updated); those outputs merge as a schedule merges them (``SplitPipe.merge_outputs``:
    a scalar, such as a loss, becomes the sum of the micro-batches' when its graph sums the batch, else
    their mean; see :mod:`pippy.frontend.reduction`). Any other batch runs at
    once; a graph that bakes in the traced size then fails with a message saying so.
    """
    flat = bind_to_traced(pipe, args, kwargs, signature)
    n = _chunks_in(pipe, flat)
    if n is None:
        _refuse_baked_count(pipe, flat)
        return _run_flat(pipe, flat)
    key = (n, tuple(tuple(x.shape) for x in flat if isinstance(x, torch.Tensor)))
    failed = pipe.local_whole_failed
    if not _writes_state(pipe) and not pipe.local_divides_by_count and not _counts_rows(pipe) and key not in failed:
        with warnings.catch_warnings(record=True) as said:  # an attempt that is dropped warns nothing
            warnings.simplefilter("always")
            try:
                whole: tuple[Any, ...] | None = _run_flat(pipe, flat)
            except _StageFailed:
                whole = None
        if whole is not None and _whole_batch(pipe, whole, n):
            for w in said:
                warnings.warn(w.message, w.category, stacklevel=3)
            return whole
        failed.add(key)  # the same batch shape would fail again: go straight to micro-batches next time
    call_args, call_kwargs = pytree.tree_unflatten(flat, pipe.in_spec)
    outs = [_run_flat(pipe, mb) for mb in pipe.split_inputs(tuple(call_args), dict(call_kwargs), n)]
    return tuple(pipe.merge_outputs(outs))


class _StageFailed(RuntimeError):
    pass


def _refuse_baked_count(pipe: SplitPipe, flat: list[Any]) -> None:
    """A batch other than the traced micro-batch (or a whole number of them) where the graph holds that micro-batch's
    row count as a number (``loss.sum() / x.shape[0]``, a returned ``x.shape[0]``): it would run, with that count."""
    if getattr(pipe, "input_dims", None) is not None or not (pipe.local_divides_by_count or _counts_rows(pipe)):
        return
    for got, ex in zip(flat, pipe.example_leaves):
        if isinstance(got, torch.Tensor) and isinstance(ex, torch.Tensor) and tuple(got.shape) != tuple(ex.shape):
            raise ValueError(
                f"pipe(...): an input has shape {list(got.shape)}, which is neither the traced micro-batch's "
                f"{list(ex.shape)} nor a whole number of them, and the graph holds the micro-batch's row count as a "
                "number (it divides by x.shape[0] or returns it), so it would compute with the traced count. Call it "
                "with a whole number of traced micro-batches, or trace with dynamic_shapes= to vary the batch"
            )


def _run_flat(pipe: SplitPipe, flat: list[Any]) -> tuple[Any, ...]:
    produced: dict[tuple[int, int], Any] = {}
    for info in pipe.stage_infos:
        inputs = [flat[r.index] if r.src_stage == USER else produced[(r.src_stage, r.index)] for r in info.inputs]
        try:
            outs = tuple(pipe.get_stage_module(info.index)(*inputs))
        except Exception as exc:
            traced = [tuple(m.shape) for m in info.input_meta if m.shape is not None]
            got = [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
            raise _StageFailed(
                f"stage {info.index} failed when the pipe was called locally: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. Its inputs have shapes {got}; it was traced for "
                f"{traced} (one micro-batch). A graph that bakes in the traced batch size runs only at that size "
                "or a whole number of micro-batches of it: call the pipe with such a batch, or use a schedule."
            ) from exc
        for j, v in enumerate(outs):
            produced[(info.index, j)] = v
    last = pipe.stage_infos[-1]
    return tuple(produced[(last.index, j)] for j in range(len(last.outputs)))


def _writes_state(pipe: SplitPipe) -> bool:
    """Whether some stage writes one of its own tensors (running statistics, counters) or an input in place:
    an attempt that failed half-way would have changed what the micro-batch runs then read."""
    if pipe.local_writes_state is None:
        pipe.local_writes_state = any(n.op in ("get_attr", "placeholder") and written_after(n)
                                      for info in pipe.stage_infos for n in info.module.graph.nodes)
    return pipe.local_writes_state


def _counts_rows(pipe: SplitPipe) -> bool:
    """Whether an output is a number that counts the micro-batch's rows (``x.shape[0]``, baked in by the trace)."""
    metas = pipe.stage_infos[-1].outputs
    red = pipe.output_reductions or ()
    return any(r == "sum" and not meta.is_tensor for r, meta in zip(red, metas))


def _whole_batch(pipe: SplitPipe, outs: tuple[Any, ...], n: int) -> bool:
    """Whether ``outs`` have the shapes of ``n`` traced micro-batches' outputs merged, and at least one output
    with a batch dim shows it (scalars alone prove nothing about a size the graph baked in)."""
    dims = pipe.output_merge_dims or [0] * len(outs)
    seen = False
    for got, meta, d in zip(outs, pipe.stage_infos[-1].outputs, dims):
        if not isinstance(got, torch.Tensor) or meta.shape is None or meta.dynamic:
            continue
        want = list(meta.shape)
        if want:
            want[d] *= n
            seen = True
        if list(got.shape) != want:
            return False
    return seen


def _chunks_in(pipe: SplitPipe, flat: list[Any]) -> int | None:
    """How many traced micro-batches the given batch holds (None when it is not a whole number > 1 of them)."""
    for got, ex in zip(flat, pipe.example_leaves):
        if isinstance(got, torch.Tensor) and isinstance(ex, torch.Tensor) and got.dim() == ex.dim() and ex.dim() > 0:
            diff = [d for d in range(ex.dim()) if got.shape[d] != ex.shape[d]]
            if len(diff) == 1 and ex.shape[diff[0]] > 0 and got.shape[diff[0]] % ex.shape[diff[0]] == 0:
                n = got.shape[diff[0]] // ex.shape[diff[0]]
                return n if n > 1 else None
    return None


def _child(spec: pytree.TreeSpec, i: int) -> pytree.TreeSpec:
    return spec.child(i) if hasattr(spec, "child") else spec.children_specs[i]

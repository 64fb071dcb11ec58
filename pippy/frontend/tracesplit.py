"""Trace a model on one micro-batch and cut it into a :class:`~pippy.frontend.pipe.SplitPipe`: ``trace_and_split``.

    >>> import torch
    >>> from pippy.frontend.trace import SplitPoint
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> split = trace_and_split(net, 2, example_args=(torch.randn(4, 4),), split_spec={"1": SplitPoint.END})
    >>> split.num_stages, [info.input_names for info in split.stage_infos]
    (2, [['input_1'], ['relu']])
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from pippy.frontend.assign import SplitPolicy, assign_stages
from pippy.frontend.batchmix import mixed_rows
from pippy.frontend.batchwarnings import (
    warn_ambiguous,
    warn_batch_statistics,
    warn_buffer_updates,
    warn_derived,
    warn_mixed_rows,
    warn_uneven,
    warn_unknown,
    written_buffers,
)
from pippy.frontend.compiled import strip_prefix, uncompiled
from pippy.frontend.describe import none_output_notice, repeated_site, returns_none
from pippy.frontend.dynamic import SymDim, describe_input_dims, export_dynamic_shapes
from pippy.frontend.embedcheck import check_embeddings
from pippy.frontend.inline import inline_regions
from pippy.frontend.lostgrad import model_backward_hooks, model_forward_hooks, warn_lost_backward, watch_backward
from pippy.frontend.modebranch import idle_branches
from pippy.frontend.mutation import written_params_across_stages
from pippy.frontend.notice import warn_user
from pippy.frontend.params import alias_groups, retarget_aliases, tensor_at
from pippy.frontend.pipe import SharedParam, SplitPipe
from pippy.frontend.precision import autocast_state, cast_example, compute_copy, restore_tensors
from pippy.frontend.reduction import MicroBatch, constant_value, divides_by_count, graph_outputs, output_reductions
from pippy.frontend.retarget import traced_device
from pippy.frontend.split import StageInfo, split_graph
from pippy.frontend.trace import (
    PipeTraceError,
    SplitPoint,
    export_module,
    is_split_marker,
    mark_split_points,
    split_site,
    unfired_split_points,
)
from pippy.frontend.trainmode import keep_following, module_modes, set_modes
from pippy.frontend.unread import match_persistence
from pippy.microbatch import (
    ambiguous_merge_dims,
    merge_chunks,
    output_merge_dims,
    split_batch,
    split_leaves,
    uneven_split_inputs,
)

__all__ = ["trace_and_split"]


def _shared_params(stages: list[StageInfo], gm: fx.GraphModule) -> list[SharedParam]:
    by_id: dict[int, list[tuple[int, str]]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for info in stages:
        for node in info.module.graph.nodes:
            if node.op != "get_attr":
                continue
            obj = tensor_at(gm, str(node.target))
            if isinstance(obj, torch.Tensor):
                by_id.setdefault(id(obj), []).append((info.index, str(node.target)))
                tensors[id(obj)] = obj
    out = []
    for key, uses in by_id.items():
        if len({s for s, _ in uses}) > 1:
            out.append(SharedParam(tuple(sorted(set(uses))), bool(tensors[key].requires_grad)))
    return out


P = TypeVar("P", bound=SplitPipe)


def trace_and_split(
    module: nn.Module,
    num_chunks: int,
    example_args: tuple[Any, ...] = (),
    example_kwargs: dict[str, Any] | None = None,
    split_spec: Mapping[str, SplitPoint] | None = None,
    split_policy: SplitPolicy | None = None,
    *,
    args_chunk_spec: Any = None,
    kwargs_chunk_spec: Any = None,
    tied_weights: str = "replicate",
    recompute_inputs: bool = True,
    compute_dtype: torch.dtype | None = None,
    dynamic_shapes: Any = None,
    pipe_cls: type[P] = SplitPipe,  # type: ignore[assignment]
) -> P:
    """Trace ``module`` on one micro-batch of the example batch and split it into stages.

    Split points come from ``pipe_split()`` calls in ``forward``, ``annotate_split_points``, a
    ``split_spec`` mapping (applied only while tracing) or a ``split_policy``. ``example_args`` is
    the full batch; it must split into ``num_chunks`` equal micro-batches. ``tied_weights``
    ("replicate" or "transmit") says how a weight read by several stages is kept (see split_graph);
    ``recompute_inputs`` rebuilds masks and other input-only values in later stages instead of sending them.
    ``compute_dtype`` (e.g. ``torch.bfloat16``, for FSDP2's ``MixedPrecisionPolicy``) traces a copy of the
    model in that dtype; the stages keep the model's own tensors (see :mod:`pippy.frontend.precision`).
    ``dynamic_shapes`` ("auto", ``{input: {dim: (lo, hi)}}`` or torch.export's form) lets those dimensions vary
    from step to step without tracing again (see :mod:`pippy.frontend.dynamic`). ``pipe_cls`` is the class of
    the result (:class:`pippy.Pipe` for :func:`pippy.pipeline`).

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> split = trace_and_split(net, 2, (torch.randn(2, 4),), split_spec={"0": SplitPoint.END})
        >>> print(split.num_stages)
        2
    """
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(
            f"num_chunks must be a positive int (the number of micro-batches the example batch splits into), got "
            f"{num_chunks!r}; e.g. pipeline(model, 4, example_args=(x,)) for a batch of 4k rows"
        )
    if not isinstance(example_args, tuple):
        example_args = (example_args,)
    inner = uncompiled(module, "pipeline()")  # torch.compile(model): the model itself, under its own names
    if inner is not module:
        module, split_spec = inner, strip_prefix(split_spec)
    kwargs = dict(example_kwargs or {})
    if num_chunks > 1:
        warn_uneven(uneven_split_inputs(example_args, kwargs, args_chunk_spec, kwargs_chunk_spec), num_chunks)
    mb_args, mb_kwargs = split_batch(example_args, kwargs, num_chunks, args_chunk_spec, kwargs_chunk_spec)[0]
    traced = module
    if compute_dtype is not None:
        traced = compute_copy(module, compute_dtype)
        mb_args, mb_kwargs = cast_example((tuple(mb_args), mb_kwargs), compute_dtype)
    dyn = None if dynamic_shapes is None else export_dynamic_shapes(traced, tuple(mb_args), mb_kwargs, dynamic_shapes)
    saved = _apply_split_spec(traced, split_spec)  # hooks while tracing only
    try:
        with watch_backward() as dropped:
            ep, lost = unfired_split_points(traced, lambda: export_module(traced, mb_args, mb_kwargs,
                                                                          dynamic_shapes=dyn))
    finally:
        _remove_hooks(saved)
    if lost:
        raise PipeTraceError(
            f"split points on {lost} never ran while tracing: such a module is called as `self.sub.forward(...)`, "
            "which skips the hook that marks it, or not at all. Expected each marked module to be called as "
            "`self.sub(...)`; or put pipe_split() in the model's code there"
        )
    gm = ep.module()
    _refuse_nested_splits(gm, dropped)
    ph_args, ph_kwargs = _traced_inputs(gm, ep.call_spec.in_spec, (tuple(mb_args), mb_kwargs))
    merge_dims = output_merge_dims(ph_args, ph_kwargs, args_chunk_spec, kwargs_chunk_spec, _output_shapes(gm))
    unsure = ambiguous_merge_dims(ph_args, ph_kwargs, args_chunk_spec, kwargs_chunk_spec, _output_shapes(gm))
    if dynamic_shapes is None and unsure:
        merge_dims = _merge_dims_by_symbols(traced, (tuple(mb_args), mb_kwargs), (args_chunk_spec, kwargs_chunk_spec),
                                            merge_dims, unsure)
    mb = _micro_batch(gm, ph_args, ph_kwargs, args_chunk_spec, kwargs_chunk_spec)
    doubled: list[fx.GraphModule | None] = []

    def twice() -> fx.GraphModule | None:  # the model traced on its micro-batch twice over (see output_reductions)
        if not doubled:
            try:
                args2 = merge_chunks([tuple(mb_args), tuple(mb_args)], args_chunk_spec)
                kwargs2 = merge_chunks([dict(mb_kwargs), dict(mb_kwargs)], kwargs_chunk_spec) if mb_kwargs else {}
                doubled.append(export_module(traced, tuple(args2), dict(kwargs2)).module())
            except Exception:  # a model that only traces at its own size: its divisors stay read as counts
                doubled.append(None)
        return doubled[0]

    if dynamic_shapes is None and _one_row(ph_args, ph_kwargs, (args_chunk_spec, kwargs_chunk_spec)):
        merge_dims = _merge_dims_by_growth(_output_shapes(gm), merge_dims, twice)
    reductions = output_reductions(gm, mb, twice if dynamic_shapes is None else None)
    warn_unknown(reductions, _output_shapes(gm))
    warn_ambiguous(reductions)
    warn_derived(reductions, [v if not isinstance(v, fx.Node) else constant_value(v) for v in graph_outputs(gm)])
    if num_chunks > 1 and dynamic_shapes is None:
        warn_mixed_rows(mixed_rows(inline_regions(gm), mb.rows, lambda: _inlined(twice())))
    warn_lost_backward(dropped, model_backward_hooks(module), model_forward_hooks(module))
    if num_chunks > 1:
        warn_batch_statistics(gm)
        warn_buffer_updates(written_buffers(gm))
    baked = divides_by_count(gm, mb)
    input_dims = describe_input_dims(gm, ep.range_constraints) if dynamic_shapes is not None else None
    _drop_guards(gm)
    retarget_aliases(gm)
    leaves = pytree.tree_flatten((tuple(mb_args), mb_kwargs))[0]
    sites = [split_site(node) for node in gm.graph.nodes if is_split_marker(node)]
    gm, assignment = assign_stages(gm, leaves, split_policy, sites)
    check_embeddings(gm, assignment, num_chunks)
    written = written_params_across_stages(gm, assignment)
    if written:
        name, at = next(iter(written.items()))
        raise PipeTraceError(
            f"forward writes parameter {name} in place (nn.Embedding(max_norm=...) renormalizes the rows it looks up; "
            f"a clamp_ or copy_ on a weight) and stages {at} read it. Each stage holds its own copy and runs its "
            "micro-batches alone, so the write would not reach the other stages and results would differ from the "
            "model. How to fix: keep every use of that parameter in one stage (move the split points), or do the "
            "write outside forward (e.g. max_norm=None and renormalize after optimizer.step())"
        )
    num_stages = max(assignment.values(), default=0) + 1
    stages = split_graph(gm, assignment, num_stages, tied_weights=tied_weights, recompute_inputs=recompute_inputs)
    if traced is not module:
        restore_tensors([info.module for info in stages], module)
    match_persistence([info.module for info in stages], set(module.state_dict()))
    pipe = pipe_cls(
        stages,
        num_chunks=num_chunks,
        in_spec=ep.call_spec.in_spec,
        out_spec=ep.call_spec.out_spec,
        example_leaves=[_example_leaf(x) for x in leaves],
        shared=_shared_params(stages, gm),
        model_name=type(module).__name__,
        args_chunk_spec=args_chunk_spec,
        kwargs_chunk_spec=kwargs_chunk_spec,
    )
    pipe._source = weakref.ref(module)
    if returns_none(pipe):
        warn_user(none_output_notice(type(module).__name__))
    if input_dims is not None and any(d is not None and any(isinstance(x, SymDim) for x in d) for d in input_dims):
        pipe.input_dims = input_dims
    pipe.output_merge_dims = merge_dims if any(merge_dims) else None
    pipe.output_reductions = reductions if any(reductions) else None
    pipe.local_divides_by_count = baked
    pipe.traced_training = module.training
    pipe.traced_modes = module_modes(module)
    pipe.idle_branches = idle_branches(module, gm.graph)  # drop path traced in eval mode: warned in train mode
    for info in stages:  # a stage module starts in the modes its graph was traced in
        set_modes(info.module, pipe.traced_modes)
        keep_following(info.module, pipe.traced_modes)
    pipe.traced_autocast = autocast_state()
    pipe.traced_device = traced_device(traced, leaves)
    pipe.compute_dtype = compute_dtype
    pipe.traced_trainable = {n: p.requires_grad for n, p in gm.named_parameters(remove_duplicate=False)}
    pipe.aliases = [sorted(names) for names in alias_groups(gm).values()]
    pipe.split_sites = None if split_policy is not None else sites
    for site in dict.fromkeys(s for s in sites or () if "split_spec" in s and sites.count(s) > 1):
        warn_user(f"pipeline(): the split point {site} was {repeated_site(site, sites.count(site))}; the pipe has "
                  f"{pipe.num_stages} stages")
    pipe.lost_backward = list(dict.fromkeys(dropped))
    return pipe


def _refuse_nested_splits(gm: fx.GraphModule, dropped: list[str]) -> None:
    """Refuse ``pipe_split()`` calls that the trace put inside a region it keeps as one op (a ``torch.autocast`` or
    ``torch.no_grad`` block, a ``torch.cond`` branch): a stage boundary cannot fall inside one op."""
    inner = [(name, node) for name, sub in gm.named_modules() if name and isinstance(sub, fx.GraphModule)
             for node in sub.graph.nodes if is_split_marker(node)]
    if inner:
        sites = "; ".join(split_site(node) for _, node in inner)
        reentrant = [d for d in dropped if "use_reentrant=True" in d]
        if reentrant:
            raise PipeTraceError(
                f"pipe_split() at {sites} follows {reentrant[0]}; torch.export puts everything after such a "
                "checkpoint in one no-grad region, so the split point would be lost and the gradients wrong. "
                "Expected use_reentrant=False: torch.utils.checkpoint(fn, *args, use_reentrant=False) (Hugging Face: "
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}))"
            )
        raise PipeTraceError(
            f"pipe_split() inside a region the trace keeps as one op ({inner[0][0]}: a torch.autocast / torch.no_grad "
            f"/ set_grad_enabled block or a torch.cond branch), at {sites}. A stage boundary cannot fall inside it, "
            "so this split point would be lost (fewer stages than split points). Expected split points outside such "
            "blocks: end the `with` block before the split point and open another after it (for split_spec, a "
            "module called inside the block cannot be a split point)"
        )


def _traced_inputs(gm: fx.GraphModule, in_spec: Any, example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The traced inputs as ``(args, kwargs)`` of the graph's own values (symbolic sizes where dynamic), else ``example``."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    leaves = pytree.tree_leaves(example)
    if len(vals) != len(leaves):
        return example  # type: ignore[no-any-return]
    merged = [v if isinstance(v, torch.Tensor) else leaf for v, leaf in zip(vals, leaves)]
    args, kwargs = pytree.tree_unflatten(merged, in_spec)
    return tuple(args), dict(kwargs)


def _output_shapes(gm: fx.GraphModule) -> list[tuple[Any, ...] | None]:
    """The traced shape of each flattened output (None for a non-tensor); a size that depends on the data
    (``h[mask]``'s rows, no hint to compare) is None too: it tells nothing of the batch, and comparing it would guard."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    vals = [v.meta.get("val") if isinstance(v, fx.Node) else v for v in pytree.tree_leaves(out.args[0])]
    return [tuple(None if isinstance(d, torch.SymInt) and not d.node.has_hint() else d for d in v.shape)
            if isinstance(v, torch.Tensor) else None for v in vals]


def _example_leaf(x: Any) -> Any:
    return torch.empty(x.shape, dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else copy.copy(x)


def _apply_split_spec(module: nn.Module, spec: Mapping[str, SplitPoint] | None) -> list[Any]:
    """Mark ``spec``'s split points for the trace only: the hooks' handles, removed by :func:`_remove_hooks`."""
    return mark_split_points(module, spec) if spec else []


def _remove_hooks(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


def _drop_guards(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    gm.recompile()


def _micro_batch(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], args_spec: Any,
                 kwargs_spec: Any) -> MicroBatch:
    """The traced micro-batch's split inputs, their sizes and the graph's placeholders that carry them."""
    split = split_leaves(args, kwargs, args_spec, kwargs_spec)
    leaves = pytree.tree_leaves((args, kwargs))
    holders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if len(holders) != len(leaves):
        return MicroBatch.of(split)
    names = [holders[i] for leaf, _ in split for i, x in enumerate(leaves) if x is leaf]
    return MicroBatch.of(split, names)


def _one_row(args: tuple[Any, ...], kwargs: dict[str, Any], specs: tuple[Any, Any]) -> bool:
    """Whether the micro-batch has size 1 along every split dim (then no dim of an output tells the batch apart)."""
    leaves = split_leaves(args, kwargs, specs[0], specs[1])
    return bool(leaves) and all(leaf.shape[d] == 1 for leaf, d in leaves)


def _merge_dims_by_growth(shapes: list[tuple[Any, ...] | None], guess: list[int],
                          twice: Callable[[], fx.GraphModule | None]) -> list[int]:
    """Merge dims for one-row micro-batches: where an output's dim 0 is not 1 but another dim is (the batch may have
    moved there, XLNet's ``[mem_len, batch, d]`` memories), the dim that grows from 1 to 2 in a trace on two rows."""
    if not any(shape and shape[0] != 1 and 1 in shape[1:] for shape in shapes):
        return guess
    gm2 = twice()
    if gm2 is None:
        return guess
    out = list(guess)
    for j, (a, b) in enumerate(zip(shapes, _output_shapes(gm2))):
        if a and b and len(a) == len(b) and a[0] != 1:
            grown = [d for d in range(len(a)) if a[d] == 1 and b[d] == 2]
            if len(grown) == 1 and all(a[d] == b[d] for d in range(len(a)) if d != grown[0]):
                out[j] = grown[0]
    return out


def _merge_dims_by_symbols(module: nn.Module, example: tuple[tuple[Any, ...], dict[str, Any]], specs: tuple[Any, Any],
                           guess: list[int], ambiguous: list[int]) -> list[int]:
    """Merge dims where outputs ``ambiguous`` have a micro-batch's size at dim 0 and at a split dim, or only at
    another dim (``o.T``): traced again with every size symbolic, the batch's own symbol shows which dim it is.
    Where that trace fails, ``guess`` and a warning."""
    args, kwargs = example
    try:
        dyn = export_dynamic_shapes(module, args, kwargs, "auto")
        ep = export_module(module, args, kwargs, dynamic_shapes=dyn)
        gm = ep.module()
        sym_args, sym_kwargs = _traced_inputs(gm, ep.call_spec.in_spec, example)
        dims = output_merge_dims(sym_args, sym_kwargs, specs[0], specs[1], _output_shapes(gm))
        if len(dims) == len(guess) and not ambiguous_merge_dims(sym_args, sym_kwargs, specs[0], specs[1],
                                                                _output_shapes(gm)):
            return dims
    except Exception:
        pass
    warn_user(
        f"pipeline(): outputs {ambiguous} have a micro-batch's size at more than one dim, or at a dim the inputs do "
        f"not split along, and tracing again with symbolic sizes failed, so pippy cannot tell which dim is the "
        f"batch and merges the outputs along {guess}. Pass output_merge_spec= to the schedule (e.g. "
        "[TensorChunkSpec(1)]) if that is wrong, or trace with a batch whose micro-batch size differs from the "
        "model's other sizes",
    )
    return guess


def _inlined(gm: fx.GraphModule | None) -> fx.GraphModule | None:
    """``gm`` with its autocast / no_grad blocks inlined, for reading (None stays None)."""
    return None if gm is None else inline_regions(gm)

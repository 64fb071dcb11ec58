"""A traced model cut into stage modules, with the data flow between them: ``SplitPipe`` and ``trace_and_split``.

This is the compiler's result, pure data: it knows nothing of the runtime. The public
:class:`pippy.Pipe` (made by :func:`pippy.pipeline`) adds ``build_stage`` on top of it.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from pippy.frontend.assign import SplitPolicy, assign_stages
from pippy.frontend.describe import describe_pipe, describe_split_sites
from pippy.frontend.dynamic import SymDim, check_dims, describe_input_dims, export_dynamic_shapes
from pippy.frontend.params import alias_groups, retarget_aliases, tensor_at
from pippy.frontend.precision import autocast_state, cast_example, compute_copy, restore_tensors
from pippy.frontend.split import StageInfo, ValueMeta, split_graph
from pippy.frontend.trace import PipeTraceError, SplitPoint, export_module, is_split_marker, split_site
from pippy.frontend.trainmode import keep_following, module_modes, set_modes
from pippy.frontend.unread import match_persistence
from pippy.microbatch import TensorChunkSpec, merge_chunks, output_merge_dims, split_batch

__all__ = ["SharedParam", "SplitPipe", "SplitPolicy", "ValueMeta", "describe_split_sites", "trace_and_split"]


@dataclass(frozen=True, slots=True)
class SharedParam:
    """One tensor read by several stages (tied weights), as ``(stage, fqn)`` pairs."""

    uses: tuple[tuple[int, str], ...]
    requires_grad: bool

    @property
    def stages(self) -> tuple[int, ...]:
        """The stages that hold a copy, ascending."""
        return tuple(sorted({s for s, _ in self.uses}))


class SplitPipe:
    """A model split into ``num_stages`` stage modules plus the edges between them.

    Build it with :func:`trace_and_split` (or, with ``build_stage``, :func:`pippy.pipeline`).
    ``get_stage_module(i)`` returns a module whose ``state_dict`` keys are the original model's FQNs.
    ``split_sites`` says where each traced split point came from (None when a ``split_policy`` split it).

        >>> import torch
        >>> from pippy.frontend.trace import SplitPoint
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
        >>> split = trace_and_split(net, 1, (torch.ones(1, 2),), split_spec={"0": SplitPoint.END})
        >>> sorted(split.get_stage_module(1).state_dict())
        ['1.bias', '1.weight']
    """

    def __init__(
        self,
        stages: list[StageInfo],
        *,
        num_chunks: int,
        in_spec: pytree.TreeSpec,
        out_spec: pytree.TreeSpec,
        example_leaves: list[Any],
        shared: list[SharedParam],
        model_name: str = "model",
        args_chunk_spec: Any = None,
        kwargs_chunk_spec: Any = None,
    ) -> None:
        self.stage_infos = stages
        self.num_chunks = num_chunks
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.example_leaves = example_leaves
        self.shared = shared
        self.model_name = model_name
        self.args_chunk_spec = args_chunk_spec
        self.kwargs_chunk_spec = kwargs_chunk_spec
        self._source: weakref.ref[nn.Module] | None = None
        self.traced_trainable: dict[str, bool] = {}  # requires_grad of every parameter when traced
        self.traced_autocast: tuple[str, str] | None = None  # the torch.autocast the pipe was traced under
        self.aliases: list[list[str]] = []  # FQNs the traced model registers one tensor under (tied weights)
        self.split_sites: list[str] | None = []  # per traced pipe_split(), in order: where it came from
        # per flattened input: each dim's static size or SymDim range (None: every shape is static)
        self.input_dims: list[tuple[int | SymDim, ...] | None] | None = None
        # per flattened output: the dim its micro-batches concatenate along without an output_merge_spec
        # (None: dim 0 for all; see pippy.microbatch.output_merge_dims)
        self.output_merge_dims: list[int] | None = None
        self.traced_training: bool | None = None  # the model's .training when traced
        self.traced_modes: dict[str, bool] | None = None  # every module's .training when traced (frontend.trainmode)
        # pipe(x) (pippy.frontend.root.run_local): whether a stage writes state or an input in place (None: not
        # yet looked), and the (micro-batch count, input shapes) whose whole-batch attempt was dropped
        self.local_writes_state: bool | None = None
        self.local_whole_failed: set[Any] = set()
        self._live: dict[int, weakref.ref[Any]] = {}  # stage index -> the built stage of this process

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.stage_infos)

    def get_stage_module(self, i: int) -> fx.GraphModule:
        """Stage ``i``'s module; keys are the original FQNs.

        Before a stage is built it shares parameters with the traced model. Once this process
        has built stage ``i`` (``PipelineStage``, ``build_stage``) and keeps it, this is the module
        that stage runs and trains (as in PiPPy, where the stage used the pipe's own module).
        """
        self._check_index(i)
        ref = self._live.get(i)
        holder = ref() if ref is not None else None
        live = getattr(holder, "submod", None)
        return live if isinstance(live, fx.GraphModule) else self.stage_infos[i].module

    def bind_stage(self, i: int, holder: Any) -> None:
        """Record (weakly) that ``holder.submod`` is the module stage ``i`` runs in this process."""
        self._check_index(i)
        self._live[i] = weakref.ref(holder)

    def source_model(self) -> nn.Module | None:
        """The model this pipe was traced from, while it is alive (held weakly)."""
        return self._source() if self._source is not None else None

    def deps(self) -> dict[int, tuple[int, ...]]:
        """For each stage, the stages it reads from (skip edges included)."""
        return {info.index: info.producer_stages for info in self.stage_infos}

    def flatten_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """Flatten one micro-batch's ``(args, kwargs)`` in the traced order, checking the structure."""
        expected_kw = _kwarg_keys(self.in_spec)
        if set(kwargs) != set(expected_kw):
            raise ValueError(
                f"the pipeline was traced with keyword arguments {sorted(expected_kw)} but got {sorted(kwargs)}; "
                "call it with the same arguments as example_args/example_kwargs (re-trace for others)"
            )
        kwargs = {k: kwargs[k] for k in expected_kw}
        with_paths, spec = pytree.tree_flatten_with_path((tuple(args), kwargs))
        leaves = [leaf for _, leaf in with_paths]
        if spec != self.in_spec:
            raise ValueError(
                f"input structure differs from the traced example.\n expected: {self.in_spec}\n got: {spec}\n"
                "Pass inputs with the same nesting as example_args/example_kwargs."
            )
        bound: dict[str, tuple[int, str]] = {}
        for k, ((path, got), ex) in enumerate(zip(with_paths, self.example_leaves)):
            name = f"input leaf {k} ({_input_name(path)})"
            if isinstance(ex, torch.Tensor):
                if not isinstance(got, torch.Tensor):
                    raise ValueError(f"{name}: expected a tensor like the example, got {type(got).__name__}")
                dims = self.input_dims[k] if self.input_dims is not None else None
                if dims is not None:
                    if got.dtype != ex.dtype:
                        raise ValueError(f"{name}: a micro-batch is {got.dtype}, but the pipeline was traced for "
                                         f"{ex.dtype}; pass the traced dtype")
                    check_dims(name, got, dims, bound)
                elif tuple(got.shape) != tuple(ex.shape) or got.dtype != ex.dtype:
                    raise ValueError(
                        f"{name}: a micro-batch has shape {tuple(got.shape)} {got.dtype}, but the pipeline was "
                        f"traced for {tuple(ex.shape)} {ex.dtype} (full batch / num_chunks). Shapes are static: "
                        "use the traced batch size and micro-batch count, or trace with pipeline(..., "
                        "dynamic_shapes='auto' or {'<input>': {dim: (lo, hi)}}) so that sizes may vary. "
                        "Every input split along the batch must have the traced batch size; an input that is not "
                        "batched needs Replicate() in args_chunk_spec/kwargs_chunk_spec."
                    )
            elif got != ex:
                raise ValueError(
                    f"{name} is the constant {got!r} but the pipeline was traced with {ex!r}; non-tensor "
                    "inputs are baked into the graph, so re-trace to change them"
                )
        return leaves

    def fill_constants(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """``args`` with trailing positional inputs that were plain values when traced filled in with those
        values (they are baked into the graph, and PiPPy let callers leave them out).

            >>> import torch
            >>> class Scaled(torch.nn.Module):
            ...     def forward(self, x, k):
            ...         return x * k
            >>> pipe = trace_and_split(Scaled(), 1, (torch.ones(1, 2), 3))
            >>> pipe.fill_constants((torch.ones(1, 2),))[1]
            3
        """
        traced = pytree.tree_unflatten(list(self.example_leaves), self.in_spec)[0]
        if len(args) >= len(traced):
            return tuple(args)
        rest = traced[len(args):]
        if any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(rest)):
            return tuple(args)  # a left-out tensor is an error the structure check names
        return (*args, *(copy.copy(v) for v in rest))

    def split_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any], n: int) -> list[list[Any]]:
        """Split a full batch into ``n`` micro-batches, each flattened for stage 0."""
        args = self.fill_constants(tuple(args))
        mbs = split_batch(args, kwargs, n, self.args_chunk_spec, self.kwargs_chunk_spec)
        if self.input_dims is None:
            return [self.flatten_inputs(a, k) for a, k in mbs]
        out = []
        for i, (a, k) in enumerate(mbs):
            try:
                out.append(self.flatten_inputs(a, k))
            except ValueError as exc:
                raise ValueError(f"micro-batch {i} of {n}: {exc}") from None
        return out

    def unflatten_output(self, flat: tuple[Any, ...] | list[Any]) -> Any:
        """Turn the last stage's flat outputs into the model's output structure."""
        return pytree.tree_unflatten(list(flat), self.out_spec)

    def merge_outputs(self, outputs: Sequence[Any], spec: Any = None) -> Any:
        """Merge per-micro-batch outputs into the full batch's: by ``spec`` when given (``output_merge_spec``),
        else along the dim :attr:`output_merge_dims` names for each output (dim 0 unless the batch was
        split along another dim that the output keeps, as ``TensorChunkSpec(1)`` for sequence-first
        tensors).

            >>> import torch
            >>> from pippy import TensorChunkSpec, pipeline
            >>> x = torch.randn(5, 4, 3)  # [seq, batch, width]
            >>> pipe = pipeline(torch.nn.Linear(3, 3), 2, (x,), args_chunk_spec=(TensorChunkSpec(1),))
            >>> pipe.output_merge_dims, pipe.merge_outputs([torch.zeros(5, 2, 3), torch.ones(5, 2, 3)]).shape
            ([1], torch.Size([5, 4, 3]))
        """
        if spec is None and self.output_merge_dims is not None and outputs:
            if len(pytree.tree_leaves(outputs[0])) == len(self.output_merge_dims):
                spec = [TensorChunkSpec(d) if d else None for d in self.output_merge_dims]  # None: the default
        return merge_chunks(outputs, spec)

    def split_report(self) -> str:
        """Each stage's cost, parameter bytes and the bytes it sends to every other stage."""
        from pippy.frontend.report import split_report

        return split_report(self)

    def _check_index(self, i: int) -> None:
        last = self.num_stages - 1
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(
                f"stage index must be an int in 0..{last}, got {i!r} ({type(i).__name__}); pass the stage number, "
                "e.g. build_stage(dist.get_rank(), device) for one stage per rank"
            )
        if not 0 <= i < self.num_stages:
            raise IndexError(
                f"stage index {i} out of range: this pipe has stages 0..{last} ({self.num_stages} stages). "
                f"Pass an index in 0..{last} (negative indices are not accepted); with one stage per rank, launch "
                f"{self.num_stages} ranks, or split the model into as many stages as there are ranks"
            )

    def __repr__(self) -> str:
        return describe_pipe(self)


def _input_name(path: tuple[Any, ...]) -> str:
    """``args[0][1]`` / ``kwargs['mask']`` for a pytree path into ``(args, kwargs)``."""
    if not path:
        return "input"
    head = "args" if path[0] == pytree.SequenceKey(0) else "kwargs"
    return head + pytree.keystr(path[1:])


def _kwarg_keys(in_spec: pytree.TreeSpec) -> list[str]:
    kw_spec = in_spec.child(1) if hasattr(in_spec, "child") else in_spec.children_specs[1]
    return list(kw_spec.context) if kw_spec.context else []


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
    kwargs = dict(example_kwargs or {})
    mb_args, mb_kwargs = split_batch(example_args, kwargs, num_chunks, args_chunk_spec, kwargs_chunk_spec)[0]
    traced = module
    if compute_dtype is not None:
        traced = compute_copy(module, compute_dtype)
        mb_args, mb_kwargs = cast_example((tuple(mb_args), mb_kwargs), compute_dtype)
    dyn = None if dynamic_shapes is None else export_dynamic_shapes(traced, tuple(mb_args), mb_kwargs, dynamic_shapes)
    saved = _apply_split_spec(traced, split_spec)
    try:
        ep = export_module(traced, mb_args, mb_kwargs, dynamic_shapes=dyn)
    finally:
        _restore_forwards(saved)
    gm = ep.module()
    ph_args, ph_kwargs = _traced_inputs(gm, ep.call_spec.in_spec, (tuple(mb_args), mb_kwargs))
    merge_dims = output_merge_dims(ph_args, ph_kwargs, args_chunk_spec, kwargs_chunk_spec, _output_shapes(gm))
    input_dims = describe_input_dims(gm, ep.range_constraints) if dynamic_shapes is not None else None
    _drop_guards(gm)
    retarget_aliases(gm)
    leaves = pytree.tree_flatten((tuple(mb_args), mb_kwargs))[0]
    sites = [split_site(node) for node in gm.graph.nodes if is_split_marker(node)]
    gm, assignment = assign_stages(gm, leaves, split_policy, sites)
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
    if input_dims is not None and any(d is not None and any(isinstance(x, SymDim) for x in d) for d in input_dims):
        pipe.input_dims = input_dims
    pipe.output_merge_dims = merge_dims if any(merge_dims) else None
    pipe.traced_training = module.training
    pipe.traced_modes = module_modes(module)
    for info in stages:  # a stage module starts in the modes its graph was traced in
        set_modes(info.module, pipe.traced_modes)
        keep_following(info.module, pipe.traced_modes)
    pipe.traced_autocast = autocast_state()
    pipe.traced_trainable = {n: p.requires_grad for n, p in gm.named_parameters(remove_duplicate=False)}
    pipe.aliases = [sorted(names) for names in alias_groups(gm).values()]
    pipe.split_sites = None if split_policy is not None else sites
    return pipe


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
    """The traced shape of each flattened output (None for a non-tensor)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    vals = [v.meta.get("val") if isinstance(v, fx.Node) else v for v in pytree.tree_leaves(out.args[0])]
    return [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in vals]


def _example_leaf(x: Any) -> Any:
    return torch.empty(x.shape, dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else copy.copy(x)


def _apply_split_spec(module: nn.Module, spec: Mapping[str, SplitPoint] | None) -> list[tuple[nn.Module, Any, Any]]:
    saved: list[tuple[nn.Module, Any, Any]] = []
    if not spec:
        return saved
    from pippy.frontend.trace import annotate_split_points

    for fqn in spec:
        try:
            sub = module.get_submodule(fqn)
        except AttributeError:
            continue  # annotate_split_points raises the helpful error below
        saved.append((sub, sub.__dict__.get("forward"), sub.__dict__.get("_pippy_split_marks")))
    try:
        annotate_split_points(module, spec)
    except PipeTraceError:
        _restore_forwards(saved)
        raise
    return saved


def _restore_forwards(saved: list[tuple[nn.Module, Any, Any]]) -> None:
    for sub, fwd, marks in saved:
        for key, val in (("forward", fwd), ("_pippy_split_marks", marks)):
            if val is None:
                sub.__dict__.pop(key, None)
            else:
                sub.__dict__[key] = val


def _drop_guards(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    gm.recompile()


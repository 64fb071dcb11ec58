"""A traced model cut into stage modules, with the data flow between them: ``SplitPipe``.

This is the compiler's result, pure data: it knows nothing of the runtime. The public
:class:`pippy.Pipe` (made by :func:`pippy.pipeline`) adds ``build_stage`` on top of it.

    >>> import torch
    >>> from pippy.frontend.trace import SplitPoint
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> from pippy.frontend.tracesplit import trace_and_split
    >>> split = trace_and_split(net, 2, example_args=(torch.randn(4, 4),), split_spec={"1": SplitPoint.END})
    >>> split.num_stages, [info.input_names for info in split.stage_infos]
    (2, [['input_1'], ['relu']])
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from pippy.frontend.assign import SplitPolicy
from pippy.frontend.describe import describe_pipe, describe_split_sites
from pippy.frontend.dynamic import SymDim, check_dims
from pippy.frontend.mismatch import dtype_advice, handcut_mismatch, input_mismatch
from pippy.frontend.notice import called_by_user, warn_user
from pippy.frontend.split import StageInfo, ValueMeta
from pippy.microbatch import Replicate, Sum, TensorChunkSpec, merge_chunks, split_batch
from pippy.microbatch.errors import PipeliningShapeError, value_error_like

__all__ = ["SharedParam", "SplitPipe", "SplitPolicy", "ValueMeta", "describe_split_sites"]


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

    Build it with :func:`pippy.frontend.tracesplit.trace_and_split` (or, with ``build_stage``, :func:`pippy.pipeline`).
    ``get_stage_module(i)`` returns a module whose ``state_dict`` keys are the original model's FQNs.
    ``split_sites`` says where each traced split point came from (None when a ``split_policy`` split it).

        >>> import torch
        >>> from pippy.frontend.trace import SplitPoint
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
        >>> from pippy.frontend.tracesplit import trace_and_split
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
        self._handed_out: set[int] = set()  # stages whose traced module the user took before building them
        self.traced_trainable: dict[str, bool] = {}  # requires_grad of every parameter when traced
        self.traced_autocast: tuple[str, str] | None = None  # the torch.autocast the pipe was traced under
        self.traced_device: torch.device | None = None  # the one device the model was traced on (frontend.retarget)
        self.compute_dtype: torch.dtype | None = None  # pipeline(compute_dtype=): float inputs are cast to it
        self.aliases: list[list[str]] = []  # FQNs the traced model registers one tensor under (tied weights)
        self.split_sites: list[str] | None = []  # per traced pipe_split(), in order: where it came from
        # what forward does that the traced backward loses (custom autograd Functions, ...): see frontend.lostgrad
        self.lost_backward: list[str] = []
        # per flattened input: each dim's static size or SymDim range (None: every shape is static)
        self.input_dims: list[tuple[int | SymDim, ...] | None] | None = None
        # per flattened output: the dim its micro-batches concatenate along without an output_merge_spec
        # (None: dim 0 for all; see pippy.microbatch.output_merge_dims)
        self.output_merge_dims: list[int] | None = None
        # per flattened output: "sum" / "mean" for a 0-dim output whose graph says how it reduces the batch
        # (pippy.frontend.reduction); such a sum merges by summing. None: not known (a mean, as merge_chunks does)
        self.output_reductions: list[str | None] | None = None
        self.traced_training: bool | None = None  # the model's .training when traced
        self.traced_modes: dict[str, bool] | None = None  # every module's .training when traced (frontend.trainmode)
        self.idle_branches: dict[str, str] | None = None  # eval-traced modules whose mode branch ran no op
        # pipe(x) (pippy.frontend.root.run_local): whether a stage writes state or an input in place (None: not
        # yet looked), and the (micro-batch count, input shapes) whose whole-batch attempt was dropped
        self.local_writes_state: bool | None = None
        self.local_divides_by_count = False  # a graph dividing by a micro-batch's baked size runs per micro-batch
        self.local_whole_failed: set[Any] = set()
        self._live: dict[int, weakref.ref[Any]] = {}  # stage index -> the built stage of this process

    def __getstate__(self) -> dict[str, Any]:
        """What pickles: everything but the live model and this process's built stages (weak references)."""
        state = dict(self.__dict__)
        state["_source"], state["_live"] = None, {}
        return state

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
        if isinstance(live, fx.GraphModule):
            return live
        if called_by_user():  # handed out before the stage exists: build_stage says it is not the stage's module
            self._handed_out.add(i)
        return self.stage_infos[i].module

    def bind_stage(self, i: int, holder: Any) -> None:
        """Record (weakly) that ``holder.submod`` is the module stage ``i`` runs in this process."""
        self._check_index(i)
        self._live[i] = weakref.ref(holder)
        if i in self._handed_out:
            self._handed_out.discard(i)
            warn_user(
                f"pipe.get_stage_module({i}) was called before stage {i} was built, so it returned the traced module; "
                f"the stage runs and trains its own copy (stage.submod). Anything applied to the module taken earlier "
                f"(an optimizer, load_state_dict, parallelize_module) misses the stage: call get_stage_module({i}) "
                "after build_stage, or use stage.submod"
            )

    def source_model(self) -> nn.Module | None:
        """The model this pipe was traced from, while it is alive (held weakly)."""
        return self._source() if self._source is not None else None

    def deps(self) -> dict[int, tuple[int, ...]]:
        """For each stage, the stages it reads from (skip edges included)."""
        return {info.index: info.producer_stages for info in self.stage_infos}

    @property
    def keyword_inputs(self) -> list[str]:
        """The model's keyword inputs as traced (``example_kwargs``' names)."""
        return _kwarg_keys(self.in_spec)

    def flatten_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                       n_microbatches: int | None = None) -> list[Any]:
        """Flatten one micro-batch's ``(args, kwargs)`` in the traced order, checking the structure
        (``n_microbatches``, the batch's count, only explains a micro-batch of another size)."""
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
            traced_args = pytree.tree_unflatten(list(self.example_leaves), self.in_spec)[0]
            if len(traced_args) != len(args):
                raise ValueError(
                    f"the pipeline was traced with {len(traced_args)} positional input(s) but got {len(args)}. Expected "
                    "the same positional inputs as example_args (the batch on the first stage's rank only: "
                    "step(x, ...) there, step() or step(target=y) on the others); re-trace for other inputs"
                )
            for i, (a, t) in enumerate(zip(args, traced_args)):
                if pytree.tree_structure(a) != pytree.tree_structure(t):
                    raise ValueError(
                        f"positional input {i} has another structure than when traced: expected "
                        f"{_shape_of(t)}, got {_shape_of(a)}. Pass inputs with the same nesting (tuples, lists, "
                        "dicts and their keys) as example_args/example_kwargs"
                    )
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
                if ex.dtype == self.compute_dtype and got.is_floating_point() and got.dtype != ex.dtype:
                    got = leaves[k] = got.to(ex.dtype)  # as FSDP2's MixedPrecisionPolicy(cast_forward_inputs) does
                dims = self.input_dims[k] if self.input_dims is not None else None
                if dims is not None:
                    if got.dtype != ex.dtype:
                        raise PipeliningShapeError(f"dtype mismatch at {name}: a micro-batch is {got.dtype}, but "
                                                   f"the pipeline was traced for {ex.dtype}; "
                                                   f"{dtype_advice(got.dtype, ex.dtype)}")
                    check_dims(name, got, dims, bound)
                elif tuple(got.shape) != tuple(ex.shape) or got.dtype != ex.dtype:
                    if getattr(self, "manual", False) or getattr(self, "learned", False):
                        raise PipeliningShapeError(handcut_mismatch(name, got, ex, getattr(self, "learned", False)))
                    raise PipeliningShapeError(input_mismatch(name, got, ex, self._split_dim(path), n_microbatches,
                                                              self.num_chunks))
            elif isinstance(got, torch.Tensor):
                raise ValueError(
                    f"{name} is a tensor {list(got.shape)} {got.dtype} but the pipeline was traced with {ex!r} there. "
                    "Inputs that were not tensors when traced are baked into the graph: pass the traced value, or "
                    "trace with a tensor in that place (example_args / example_kwargs)"
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
            >>> from pippy.frontend.tracesplit import trace_and_split
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
        mbs = split_batch(args, kwargs, n, self.args_chunk_spec, self.kwargs_chunk_spec if kwargs else None)
        if self.input_dims is None:
            return [self.flatten_inputs(a, k, n) for a, k in mbs]
        out = []
        for i, (a, k) in enumerate(mbs):
            try:
                out.append(self.flatten_inputs(a, k))
            except ValueError as exc:  # a shape error stays one (PipeliningShapeError)
                raise value_error_like(exc)(f"micro-batch {i} of {n}: {exc}") from None
        return out

    def _split_dim(self, path: tuple[Any, ...]) -> int:
        """The dim a positional input at ``path`` is split along (``args_chunk_spec``), else 0."""
        spec = self.args_chunk_spec
        if len(path) >= 2 and path[0] == pytree.SequenceKey(0) and isinstance(spec, (tuple, list)):
            i = getattr(path[1], "idx", None)
            return int(getattr(spec[i], "dim", 0)) if isinstance(i, int) and i < len(spec) else 0
        return 0

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
        if spec is None and outputs:
            spec = self.default_merge_spec(len(pytree.tree_leaves(outputs[0])))
        return merge_chunks(outputs, spec)

    def default_merge_spec(self, n_leaves: int, sums: Sequence[int] = ()) -> list[Any] | None:
        """The flat merge spec of the outputs without an ``output_merge_spec``: each output's merge dim, and
        ``Sum()`` for an output whose graph sums the batch away (:attr:`output_reductions`) or whose index is in
        ``sums`` (``Sum(mean=True)`` for one that averages it, ``Replicate()`` for one alike in every
        micro-batch); None when every output takes the default (dim 0; 0-dim outputs averaged).

            >>> import torch
            >>> from pippy import pipeline
            >>> class Net(torch.nn.Module):
            ...     def forward(self, x):
            ...         return x * 2, (x * 2).sum()
            >>> pipe = pipeline(Net(), 2, (torch.ones(4, 3),))
            >>> pipe.default_merge_spec(2)
            [None, Sum(mean=False)]
            >>> [t.shape for t in pipe.merge_outputs([pipe.get_stage_module(0)(torch.ones(2, 3))] * 2)]
            [torch.Size([4, 3]), torch.Size([])]
        """
        dims = self.output_merge_dims if self.output_merge_dims and len(self.output_merge_dims) == n_leaves else None
        red = self.output_reductions if self.output_reductions and len(self.output_reductions) == n_leaves else None
        if dims is None and red is None and not sums:
            return None
        spec: list[Any] = [TensorChunkSpec(dims[j]) if dims and dims[j] else None for j in range(n_leaves)]
        for j in range(n_leaves):
            if j in sums or (red is not None and red[j] == "sum"):
                spec[j] = Sum()
            elif red is not None and red[j] == "mean":
                spec[j] = Sum(mean=True)  # a [1]-shaped mean stays [1]
            elif red is not None and red[j] in ("same", "derived"):
                spec[j] = Replicate()  # alike in every micro-batch: given once (derived: one micro-batch's, warned)
        return spec

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


class _Shown:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _shape_of(value: Any) -> str:
    """A value's nesting for messages: tensors as ``Tensor[2, 3]``, containers as themselves."""
    return repr(pytree.tree_map(lambda v: _Shown(f"Tensor{list(v.shape)}") if isinstance(v, torch.Tensor) else v,
                                value))


def _kwarg_keys(in_spec: pytree.TreeSpec) -> list[str]:
    kw_spec = in_spec.child(1) if hasattr(in_spec, "child") else in_spec.children_specs[1]
    return list(kw_spec.context) if kw_spec.context else []

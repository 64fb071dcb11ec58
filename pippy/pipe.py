"""The public Pipe and ``pipeline()``: the frontend's split model plus ``build_stage``, which makes the runtime stage.

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> pipe = pipeline(net, 2, example_args=(torch.randn(4, 4),), split_spec={"1": SplitPoint.END})
    >>> pipe.num_stages, pipe.build_stage(1, "cpu")
    (2, PipelineStage(index=1, of=2, device=cpu))
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import fx, nn

from pippy.frontend.compiled import strip_prefix, uncompiled
from pippy.frontend.materialize import Checkpoint
from pippy.frontend.pipe import SplitPipe, SplitPolicy
from pippy.frontend.root import root_module, run_local
from pippy.frontend.trace import SplitPoint
from pippy.frontend.tracesplit import trace_and_split
from pippy.microbatch import TensorChunkSpec
from pippy.pipeinfo import PipeInfo, pipe_info
from pippy.runtime.build import build_stage
from pippy.runtime.userstage import PipelineStage

__all__ = ["ArgsChunkSpec", "KwargsChunkSpec", "Pipe", "pipeline"]


class Pipe(SplitPipe):
    """A model split into ``num_stages`` stage modules plus the edges between them; ``print(pipe)`` shows them.

    Made by :func:`pipeline`. ``get_stage_module(i)`` returns a module whose ``state_dict`` keys
    are the original model's FQNs; ``build_stage(i, device)`` makes the runtime stage.

        >>> import torch
        >>> pipe = pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),))
        >>> print(pipe)
        Pipe(Linear: 1 stages, 1 chunks)
        def forward(self, in0):
            (s0_0,) = self.submod_0(in0)  # 6 params
            return unflatten((s0_0,))
        edges:
    """

    def build_stage(
        self,
        i: int,
        device: torch.device | str,
        group: Any = None,
        *,
        checkpoint: Checkpoint | None = None,
        init_fn: Callable[[nn.Module], None] | None = None,
        recompute: bool | Literal["full", "pointwise"] = False,
        pp_dim: str = "pp",
    ) -> PipelineStage:
        """The runtime stage ``i`` on ``device``: see :func:`pippy.runtime.build.build_stage`.

        ``group`` may be a ``DeviceMesh``: its ``pp_dim`` dimension is the pipeline.

        Under torchrun: ``pipe.build_stage(dist.get_rank(), torch.device("cpu"))``, or, for a model
        traced on the meta device, ``pipe.build_stage(rank, "cuda", checkpoint="model.safetensors")``.

            >>> pipe = pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),))
            >>> pipe.build_stage(0, "cpu").is_last
            True
        """
        return build_stage(self, i, device, group, checkpoint=checkpoint, init_fn=init_fn, recompute=recompute,
                           pp_dim=pp_dim)

    def info(self) -> PipeInfo:
        """The pipe's graph, stage count and loss flag, for ``build_stage(stage_module, i, pipe.info(), device)``
        (PyTorch pipelining's ``Pipe.info``).

            >>> pipe = pipeline(torch.nn.Linear(2, 2), 2, (torch.ones(4, 2),))
            >>> pipe.info().num_stages
            1
        """
        return pipe_info(self)

    def to(self, *args: Any, **kwargs: Any) -> Pipe:
        """Move the pipe's stage modules to a device; returns the pipe (PyTorch pipelining's ``Pipe`` is a module).

        As ``nn.Module.to``, for devices: stages built afterwards start from the moved modules and
        go to the ``device`` given to ``build_stage``; a stage built before keeps its own copy where
        it is. The dtypes stay those traced (the messages between stages carry them): cast the
        model before ``pipeline()``.

            >>> pipe = pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),))
            >>> pipe.to("cpu") is pipe, pipe.build_stage(0, torch.device("cpu")).device
            (True, device(type='cpu'))
        """
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            raise TypeError(
                f"Pipe.to({', '.join(map(repr, args))}): expected a device only, got the dtype {dtype}. The pipe's "
                "stages send the dtypes they were traced in; cast the model (model.to(dtype)) before pipeline(), or "
                "pass torch.autocast / compute_dtype= to pipeline()"
            )
        for info in self.stage_infos:
            info.module.to(device, non_blocking=non_blocking)
        return self

    # ------------------------------------------------------------------ PiPPy's Pipe surface
    has_loss_and_backward = False  # PiPPy's flag: pippy never folds a loss and backward into the pipe

    signature: inspect.Signature | None = None  # the model's forward signature, set by pipeline()

    @staticmethod
    def from_tracing(
        mod: nn.Module,
        num_chunks: int,
        example_args: tuple[Any, ...],
        example_kwargs: dict[str, Any] | None = None,
        split_policy: SplitPolicy | None = None,
    ) -> Pipe:
        """PiPPy's constructor: the same as ``pipeline(mod, num_chunks, example_args, example_kwargs, split_policy=...)``.

            >>> Pipe.from_tracing(torch.nn.Linear(2, 2), 2, (torch.ones(4, 2),)).num_stages
            1
        """
        return pipeline(mod, num_chunks, example_args, example_kwargs, split_policy=split_policy)

    @property
    def split_gm(self) -> fx.GraphModule:
        """The whole pipe as one GraphModule: children ``submod_<i>`` (the stage modules) called in order.

            >>> pipe = pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),))
            >>> [name for name, _ in pipe.split_gm.named_children()]
            ['submod_0']
        """
        return root_module(self)

    def print_readable(self) -> None:
        """Print the root graph and every stage's code (PiPPy's ``Pipe.print_readable``)."""
        self.split_gm.print_readable()

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Run every stage in this process on the given batch; returns the model's flattened outputs, as PiPPy did.

        Autograd is kept, so ``.backward()`` on the result reaches the stage modules' parameters.

            >>> net = torch.nn.Linear(2, 3)
            >>> x = torch.ones(4, 2)
            >>> torch.equal(pipeline(net, 2, (x,))(x)[0], net(x))
            True
        """
        return run_local(self, args, kwargs, self.signature)

    forward = __call__

    def train(self, mode: bool = True) -> Pipe:
        """Put every stage module (the built one where this process built the stage) in train mode, or eval mode.

        As ``nn.Module.train`` (PiPPy's ``Pipe`` was a module): dropout and batch norm follow it
        (see :mod:`pippy.frontend.trainmode`).

            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
            >>> pipe = pipeline(net, 1, (torch.ones(1, 2),))
            >>> x = torch.ones(3, 2)
            >>> pipe.eval().training, torch.equal(pipe(x)[0], net[0](x))
            (False, True)
        """
        for i in range(self.num_stages):
            self.get_stage_module(i).train(mode)
        return self

    def eval(self) -> Pipe:
        """``train(False)``: every stage module in eval mode."""
        return self.train(False)

    @property
    def training(self) -> bool:
        """True when every stage module is in train mode."""
        return all(self.get_stage_module(i).training for i in range(self.num_stages))

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of every stage module, named ``submod_<i>.<original FQN>`` (as PiPPy's Pipe module had them)."""
        return self.split_gm.named_parameters(prefix=prefix, recurse=recurse)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """Parameters of every stage module (see :meth:`named_parameters`)."""
        return self.split_gm.parameters(recurse=recurse)

    @property
    def new_to_old_qualname_mapping(self) -> dict[str, str]:
        """Every pipe parameter and buffer name (``submod_<i>.<FQN>``) to the model's own FQN (PiPPy's attribute).

            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
            >>> pipe = pipeline(net, 1, (torch.ones(1, 2),), split_spec={"0": SplitPoint.END})
            >>> pipe.new_to_old_qualname_mapping["submod_1.1.weight"]
            '1.weight'
        """
        return {name: self.remap_qualname(name) for name, _ in self.split_gm.named_parameters(remove_duplicate=False)}

    def remap_qualname(self, qualname: str) -> str:
        """The model's FQN for a pipe name: ``[split_gm.]submod_<i>.<FQN>`` -> ``<FQN>`` (PiPPy's ``Pipe.remap_qualname``).

            >>> pipe = pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),))
            >>> pipe.remap_qualname("split_gm.submod_0.weight"), pipe.remap_qualname("weight")
            ('weight', 'weight')
        """
        name = qualname.removeprefix("split_gm.")
        head, _, rest = name.partition(".")
        if rest and head.startswith("submod_") and head[len("submod_"):].isdigit():
            return rest
        return name


_DEFAULT_SPECS: dict[str, contextvars.ContextVar[Any]] = {  # per thread / task, set by the context managers
    "args": contextvars.ContextVar("pippy_args_chunk_spec", default=None),
    "kwargs": contextvars.ContextVar("pippy_kwargs_chunk_spec", default=None),
}


class ArgsChunkSpec:
    """PiPPy's context manager: chunk dims of the positional inputs for every ``pipeline()`` call inside it.

        >>> with ArgsChunkSpec((1,)):
        ...     pipe = pipeline(torch.nn.Softmax(dim=0), 2, (torch.ones(3, 4),))
        >>> pipe.args_chunk_spec, pipe.example_leaves[0].shape
        ((TensorChunkSpec(dim=1),), torch.Size([3, 2]))
    """

    key = "args"

    def __init__(self, chunk_dims: Any) -> None:
        self.spec = _as_specs(chunk_dims)
        self._tokens: list[Any] = []

    def __enter__(self) -> Any:
        var = _DEFAULT_SPECS[self.key]
        self._tokens.append(var.set(self.spec))  # a stack: the same instance may be entered again inside
        return self.spec

    def __exit__(self, *exc: object) -> None:
        _DEFAULT_SPECS[self.key].reset(self._tokens.pop())


class KwargsChunkSpec(ArgsChunkSpec):
    """PiPPy's context manager: chunk dims of keyword inputs by name, e.g. ``KwargsChunkSpec({"mask": 0})``.

        >>> with KwargsChunkSpec({"input": 0}):
        ...     pipe = pipeline(torch.nn.Linear(2, 1), 2, (), {"input": torch.ones(4, 2)})
        >>> pipe.kwargs_chunk_spec
        {'input': TensorChunkSpec(dim=0)}
    """

    key = "kwargs"


def _as_specs(dims: Any) -> Any:
    if isinstance(dims, int):
        return TensorChunkSpec(dims)
    if isinstance(dims, dict):
        return {k: _as_specs(v) for k, v in dims.items()}
    if isinstance(dims, list | tuple):
        return type(dims)(_as_specs(v) for v in dims)
    return dims


def pipeline(
    module: nn.Module,
    num_chunks: int | tuple[Any, ...] | None = None,
    example_args: tuple[Any, ...] = (),
    example_kwargs: dict[str, Any] | None = None,
    split_spec: Mapping[str, SplitPoint] | None = None,
    split_policy: SplitPolicy | None = None,
    *,
    mb_args: tuple[Any, ...] | None = None,
    mb_kwargs: dict[str, Any] | None = None,
    args_chunk_spec: Any = None,
    kwargs_chunk_spec: Any = None,
    tied_weights: str = "replicate",
    recompute_inputs: bool = True,
    compute_dtype: torch.dtype | None = None,
    dynamic_shapes: Any = None,
) -> Pipe:
    """Trace ``module`` on one micro-batch of the example batch and split it into stages.

    Split points come from ``pipe_split()`` calls in ``forward``, ``annotate_split_points``, a
    ``split_spec`` mapping (applied only while tracing) or a ``split_policy``. ``example_args`` is
    the full batch; it must split into ``num_chunks`` equal micro-batches. ``tied_weights``
    ("replicate" or "transmit") says how a weight read by several stages is kept;
    ``recompute_inputs`` rebuilds masks and other input-only values in later stages instead of
    sending them (see :func:`pippy.frontend.tracesplit.trace_and_split`). ``compute_dtype`` traces in the
    dtype the stages compute in under FSDP2 mixed precision (``torch.bfloat16``); the stages keep
    the model's own tensors. ``dynamic_shapes`` lets dimensions vary between steps without tracing again:
    ``"auto"``, ``{"input_ids": {1: (2, 2048)}}`` (per micro-batch; inputs not named follow), or
    torch.export's own form (see :mod:`pippy.frontend.dynamic`).

    PyTorch's own pipelining package's form works too: ``pipeline(module, mb_args=(x_mb,),
    mb_kwargs=..., split_spec=..., split_policy=...)``, or ``pipeline(module, (x_mb,), mb_kwargs,
    split_spec, split_policy)`` positionally, traces on that one micro-batch (``num_chunks=1``); schedules
    then split a full batch into micro-batches of its size.

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> pipe = pipeline(net, 2, (torch.randn(2, 4),), split_spec={"0": SplitPoint.END})
        >>> print(pipe.num_stages)
        2
        >>> pipeline(net, mb_args=(torch.randn(1, 4),), split_spec={"0": SplitPoint.END}).num_chunks
        1
    """
    if isinstance(num_chunks, tuple | list):  # PyTorch pipelining's pipeline(module, mb_args, mb_kwargs, ...)
        if mb_args is not None:
            raise TypeError("pipeline(): pass the micro-batch once, positionally or as mb_args=, not both")
        given = example_args  # the slot its mb_kwargs takes when passed positionally
        if given not in ((), None) and not isinstance(given, dict):
            raise TypeError(f"pipeline(module, mb_args, mb_kwargs, ...): mb_kwargs must be a dict, got "
                            f"{type(given).__name__}; put every positional input in the mb_args tuple")
        if isinstance(given, dict) and mb_kwargs is not None:
            raise TypeError("pipeline(): pass mb_kwargs once, positionally or as mb_kwargs=, not both")
        mb_args, num_chunks = tuple(num_chunks), None
        mb_kwargs = given if isinstance(given, dict) else mb_kwargs
        # split_spec and split_policy land one slot over when positional, or stay put as keywords: a mapping is the
        # spec, a function the policy
        found = [v for v in (example_kwargs, split_spec, split_policy) if v is not None]
        example_args, example_kwargs = (), None
        specs = [v for v in found if isinstance(v, Mapping)]
        policies = [v for v in found if not isinstance(v, Mapping)]
        if len(specs) > 1 or len(policies) > 1 or any(not callable(v) for v in policies):
            raise TypeError(
                "pipeline(module, mb_args, mb_kwargs=None, split_spec=None, split_policy=None): expected at most one "
                f"split_spec mapping and one split_policy function, got {[type(v).__name__ for v in found]}"
            )
        split_spec = specs[0] if specs else None
        split_policy = policies[0] if policies else None
    if mb_args is not None or mb_kwargs is not None:
        if num_chunks not in (None, 1) or example_args or example_kwargs:
            raise TypeError(
                "pipeline(): mb_args/mb_kwargs (one micro-batch, PyTorch pipelining's form) trace with "
                "num_chunks=1; pass either them or num_chunks with example_args/example_kwargs (the full batch)"
            )
        mb_args = (mb_args,) if isinstance(mb_args, torch.Tensor) else tuple(mb_args) if mb_args is not None else ()
        num_chunks, example_args, example_kwargs = 1, mb_args, mb_kwargs
    if num_chunks is None:
        raise TypeError(
            "pipeline() needs num_chunks and the example batch: pipeline(model, num_chunks, example_args=(x,)), "
            "or one micro-batch as mb_args=(x_mb,)"
        )
    inner = uncompiled(module, "pipeline()")  # torch.compile(model): traced as the model itself (see frontend/compiled)
    if inner is not module:
        module, split_spec = inner, strip_prefix(split_spec)
    if args_chunk_spec is None:
        args_chunk_spec = _DEFAULT_SPECS["args"].get()
    if kwargs_chunk_spec is None:
        kwargs_chunk_spec = _DEFAULT_SPECS["kwargs"].get()
    pipe = trace_and_split(
        module, num_chunks, example_args, example_kwargs, split_spec, split_policy,
        args_chunk_spec=args_chunk_spec, kwargs_chunk_spec=kwargs_chunk_spec, tied_weights=tied_weights,
        recompute_inputs=recompute_inputs, compute_dtype=compute_dtype, dynamic_shapes=dynamic_shapes, pipe_cls=Pipe,
    )
    try:
        pipe.signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # a forward without a readable signature: calls must match the example
        pipe.signature = None
    return pipe

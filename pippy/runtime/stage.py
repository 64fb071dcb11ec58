"""One pipeline stage at run time: forward, input-grad and weight-grad per micro-batch; knows no schedule.

The stage owns every activation of its micro-batches: what backward needs while training, and,
in forward-only runs, its outputs until their last reader took them. The executor decides the
order of the calls; the user-facing :class:`pippy.PipelineStage` adds ``stage(x)`` on top.

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> pipe = pipeline(net, 2, example_args=(torch.randn(4, 4),), split_spec={"1": SplitPoint.END})
    >>> first = Stage(pipe, 0, "cpu")
    >>> out = first.forward(0, [torch.randn(2, 4)], training=True)
    >>> first.live_microbatches(), out[0].shape
    (1, torch.Size([2, 4]))
    >>> len(first.backward(0, [torch.ones(2, 4)]))   # one gradient per stage input
    1
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn

from pippy.frontend.materialize import pending_tensors
from pippy.frontend.mutation import written_placeholders
from pippy.frontend.pipe import SplitPipe
from pippy.frontend.pointwise import recompute_pointwise
from pippy.frontend.split import StageInfo
from pippy.frontend.stagemodule import StageModule, materialize_module
from pippy.frontend.trainmode import effective_modes, keep_following, set_modes
from pippy.runtime.stagebackward import StageBackward, _bytes, _MbState
from pippy.runtime.stageerror import PipeliningShapeError, StageCountError, StageError
from pippy.runtime.wgrad import WeightGradTaps
from pippy.sim.memory import SavedBytes

__all__ = ["PipeliningShapeError", "Stage", "StageCountError", "StageError"]


class Stage(StageBackward, StageModule):
    """Stage ``stage_index`` of ``pipe`` on ``device``: its module and per-micro-batch state.

        >>> import torch
        >>> from pippy import SplitPoint, pipeline
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> pipe = pipeline(net, 1, example_args=(torch.ones(1, 2),), split_spec={"0": SplitPoint.END})
        >>> Stage(pipe, 1, "cpu")
        Stage(index=1, of=2, device=cpu)
    """

    def __init__(self, pipe: SplitPipe, stage_index: int, device: torch.device | str = "cpu", group: Any = None,
                 *, module: nn.Module | None = None) -> None:
        pipe._check_index(stage_index)
        self.pipe = pipe
        self.index = stage_index
        self.device = torch.device(device)
        self.group = group
        self.info: StageInfo = pipe.stage_infos[stage_index]
        # the pipe's stage module gets a copy on ``device``; a given ``module`` (a hand-cut stage) is used as is
        self.submod: fx.GraphModule
        self._flat_graph: fx.Graph | None
        if module is None:
            self.submod, self._flat_graph = materialize_module(self.info.module, self.device, stage_index,
                                                                 getattr(pipe, "traced_device", None))
            traced = getattr(pipe, "traced_modes", None)
            if traced is not None:  # the outlined tree starts in the modes of the pipe's stage module
                set_modes(self.submod, effective_modes(self.info.module, traced))
                keep_following(self.submod, traced)  # direct calls of the module follow its modes too
        else:  # a hand-cut stage (ManualPipelineStage)
            self.submod, self._flat_graph = module, None  # type: ignore[assignment]
        self._taps: WeightGradTaps | None = None
        # whether this step's backward graph runs torch.compile'd code (looked up at the step's first I; see I)
        self._compiled_backward: bool | None = None
        self._taps_key: tuple[tuple[int, bool], ...] = ()  # the parameters (identity, requires_grad) they were built on
        self._filled = False  # checked at the first forward: no NaN placeholder of a meta-device model is left
        self._mode_sig: tuple[bool, ...] | None = None  # the module flags the graphs were last rewritten for
        self._written: frozenset[int] | None = None
        self._pointwise = False
        # split backward through the module itself (its hooks fire; W is a second autograd pass) instead of
        # through the flat tapped graph: set by the executor for FSDP2, DDP and hooked stages
        self.through_hooks = False
        self._state: dict[int, _MbState] = {}
        self.measure_activations = False  # count bytes autograd saves per micro-batch (small overhead)
        self.rank_hint: int | None = None  # set by the executor, for messages
        self.steps_trained = 0
        """Training steps this stage finished (a schedule's ``step``; ``eval`` does not count); the same on every
        rank of a pipeline. ``pippy.checkpoint`` saves it and ``load`` restores it, so a resumed run knows its step."""
        self.checkpoint_run: str | None = None  # the run a checkpoint load resumed (pippy.checkpoint_steps.run_of)

    # ----------------------------------------------------------------- properties
    @property
    def stage_index(self) -> int:
        """This stage's index (PiPPy's name for ``index``)."""
        return self.index

    @property
    def num_stages(self) -> int:
        """Stages in the whole pipe."""
        return self.pipe.num_stages

    @property
    def is_first(self) -> bool:
        """True for stage 0."""
        return self.index == 0

    @property
    def is_last(self) -> bool:
        """True for the last stage."""
        return self.index == self.pipe.num_stages - 1

    @property
    def group_rank(self) -> int:
        """This process's rank in the stage's pipeline group (PyTorch pipelining's name; 0 without a group)."""
        return dist.get_rank(self.group) if dist.is_available() and dist.is_initialized() else 0

    @property
    def group_size(self) -> int:
        """Ranks in the stage's pipeline group (PyTorch pipelining's name; 1 without a group)."""
        return dist.get_world_size(self.group) if dist.is_available() and dist.is_initialized() else 1

    @property
    def pointwise_recompute(self) -> bool:
        """Whether split backward's tapped copy recomputes elementwise chains (set by
        ``enable_recompute(stage, "pointwise")``, which also rewrites :attr:`submod`)."""
        return self._pointwise

    @pointwise_recompute.setter
    def pointwise_recompute(self, on: bool) -> None:
        if on != self._pointwise:
            self._pointwise, self._taps = on, None

    @property
    def taps(self) -> WeightGradTaps:
        """The weight-gradient taps of split-backward schedules (built on first use, again after
        :meth:`refresh_taps` saw the parameters change)."""
        if self._taps is None:
            self._taps_key = self._params_key()
            self._taps = WeightGradTaps(self.flat_module())
            if self.pointwise_recompute:  # the tapped copy recomputes its elementwise chains too
                recompute_pointwise(self._taps.module, skip_param_readers=True)
        return self._taps

    def _params_key(self) -> tuple[tuple[int, bool], ...]:
        return tuple((id(p), p.requires_grad) for p in self.submod.parameters())

    def refresh_taps(self) -> None:
        """Before a training step: drop the taps when a parameter was replaced (``load_state_dict(assign=True)``),
        frozen or unfrozen since they were built (they hold the tensors and flags they saw), and look again whether
        the backward runs compiled code (``torch.compile`` may have been applied since)."""
        if self._taps is not None and not self._state and self._params_key() != self._taps_key:
            self._taps = None
        self._compiled_backward = None

    def unfrozen_params(self) -> list[str]:
        """The stage's parameters that are trainable now but were frozen when the model was traced."""
        traced = self.pipe.traced_trainable
        return [n for n, p in self.unwrapped.named_parameters() if p.requires_grad and not traced.get(n, True)]

    def live_microbatches(self) -> int:
        """Micro-batches whose activations this stage still holds."""
        return len(self._state)

    def live_activation_bytes(self) -> int:
        """Bytes autograd saved for the live micro-batches (0 unless ``measure_activations`` is set).

        Counts each storage once per micro-batch and leaves parameters out, so it is the
        activation memory the schedule keeps alive, comparable with the simulator's memory model.
        """
        return sum(_bytes(st) for st in self._state.values())

    # ----------------------------------------------------------------- forward
    def forward(
        self, mb: int, inputs: Sequence[Any], *, training: bool, split_backward: bool = False, readers: int = 0,
        grad_inputs: Collection[int] = (), kwargs: dict[str, Any] | None = None,
    ) -> tuple[Any, ...]:
        """Run the stage on one micro-batch; keep what backward needs when ``training``.

        Forward-only (``training=False``), the outputs are kept until ``readers`` calls of
        :meth:`release` (the local consumers and the send) have taken them. Backward returns the
        gradients of the inputs traced as requiring one, and of those at the positions
        ``grad_inputs`` (a user's input that requires grad now). ``kwargs`` are keyword inputs of a
        hand-cut stage's module (each rank's own, from its ``step()``).
        """
        if len(inputs) != len(self.info.inputs):
            raise StageError(
                f"{self.where(mb, 'F')}: expected {len(self.info.inputs)} inputs "
                f"({', '.join(self.info.input_names)}), got {len(inputs)}"
            )
        self.follow_modes()
        if torch.is_autocast_enabled(self.device.type) and self._swaps_params():
            # autocast caches a parameter's cast copy until its region ends, and a pipeline runs every micro-batch in
            # one region: FSDP2 swaps in new unsharded parameters between a backward and the next forward, so a
            # cached copy would carry the gradient to a stale one (1F1B grads off by 25-50%). One cast per forward
            # there; other stages keep the cache (one cast copy per step, as one forward over the batch has).
            torch.clear_autocast_cache()
        if not self._filled:
            self._check_filled(mb)
        if mb in self._state:
            raise StageError(f"{self.where(mb, 'F')}: forward ran twice for this micro-batch without a backward")
        if not training:
            with torch.no_grad():
                outs = self._counted(mb, self._call(self.submod, inputs, kwargs), len(self.info.outputs))
            if readers > 0:
                self._state[mb] = _MbState([], outs, training=False, readers=readers)
            return outs
        leaves = [
            x.detach().requires_grad_(meta.requires_grad or k in grad_inputs) if isinstance(x, torch.Tensor) else x
            for k, (x, meta) in enumerate(zip(inputs, self.info.input_meta))
        ]
        use_taps = split_backward and not self.through_hooks and isinstance(self.submod, fx.GraphModule)
        taps = self.taps if use_taps else None
        fn = taps.module if taps is not None else self.submod
        # a hooked module gets a non-leaf alias of each input: torch's multi-grad hooks on module inputs (ModuleTracker,
        # FlopCounterMode) refuse a leaf under the I pass's autograd.grad
        fed = leaves if taps is not None or not self.through_hooks else [
            x.view_as(x) if isinstance(x, torch.Tensor) and x.requires_grad else x for x in leaves]
        if self.measure_activations:
            with SavedBytes(skip=self.submod.parameters()) as counter:
                res = self._call(fn, fed, kwargs)
        else:
            res = self._call(fn, fed, kwargs)
        n_out = len(self.info.outputs)
        if taps is not None:
            outs, tapped, aux = taps.split(res, n_out)
            self._state[mb] = _MbState(leaves, outs, tapped=True, taps=tapped, aux=aux)
        else:
            outs = self._counted(mb, res, n_out)
            self._state[mb] = _MbState(leaves, outs)
        if self.measure_activations:
            self._state[mb].counter = counter
        return outs

    def _counted(self, mb: int, res: tuple[Any, ...], n_out: int) -> tuple[Any, ...]:
        """``res`` if it has the ``n_out`` outputs this stage sends (a hand-cut module may return another count)."""
        if len(res) != n_out:
            raise StageError(
                f"{self.where(mb, 'F')}: the stage's module returned {len(res)} output(s), expected {n_out} "
                f"({', '.join(self.info.output_names)}), the outputs this stage's messages and the schedule were built "
                "for (a hand-cut stage fixes them at its first step, or from output_args). Return the same outputs "
                "every step, or build new stages and a new schedule for the new form"
            )
        return res

    def counting_loss(self, mb: int) -> AbstractContextManager[Any]:
        """With ``measure_activations``: count what the loss of ``mb`` saves with its forward's bytes
        (each storage once), as the profiler's ``act_bytes`` does."""
        st = self._state.get(mb)
        return nullcontext() if st is None or st.counter is None else st.counter  # its total: see _bytes

    def _swaps_params(self) -> bool:
        """Whether the stage's parameters are sharded (FSDP2, DTensor): their tensors change between passes. Asked
        per forward under autocast only, so sharding applied after a step counts too."""
        return any(hasattr(m, "set_requires_gradient_sync") for m in self.submod.modules()) or any(
            hasattr(p, "placements") for p in self.submod.parameters())

    def _check_filled(self, mb: int) -> None:
        """Refuse to run on the NaN placeholders of a model traced on the meta device that nothing filled."""
        pending = pending_tensors(self.unwrapped)
        left = []
        for name in pending:
            try:
                t = self.unwrapped.get_parameter(name)
            except AttributeError:
                t = self.unwrapped.get_buffer(name)
            local = getattr(t, "_local_tensor", t)  # a DTensor shard: look at this rank's part
            if local.numel() and bool(local.isnan().all()):
                left.append(name)
        if left:
            raise StageError(
                f"{self.where(mb, 'F')}: {len(left)} of this stage's tensors ({', '.join(left[:4])}"
                f"{' ...' if len(left) > 4 else ''}) are still the NaN placeholders of a model traced on the meta "
                "device. Expected real values before the first step: build the stage with checkpoint=... or "
                "init_fn=..., or load them with stage.submod.load_state_dict(...)"
            )
        if pending:
            self.unwrapped._pippy_pending = []
        self._filled = True

    def _written_inputs(self) -> frozenset[int]:
        """Inputs the stage graph writes in place (``relu_`` right after a split point): they run on a copy."""
        if self._written is None:  # the pipe's flat stage graph: also right under a DDP / FSDP wrapper
            gm = self.info.module
            traced = isinstance(gm, fx.GraphModule) and not getattr(self.pipe, "manual", False)
            graph = self._flat_graph if self._flat_graph is not None else gm  # the one that follows the modes
            self._written = frozenset(written_placeholders(graph) if traced else ())  # a hand-cut stage: as given
        return self._written

    def _call(self, fn: Any, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> tuple[Any, ...]:
        written = self._written_inputs()
        if written:  # a received leaf cannot be written in place, and a local sender may still hold the tensor
            args = [x.clone() if i in written and isinstance(x, torch.Tensor) else x for i, x in enumerate(args)]
        try:
            return _as_tuple(fn(*args, **(kwargs or {})))
        except RuntimeError as exc:
            if "size" in str(exc) and any(hasattr(p, "placements") for p in self.submod.parameters()):
                exc.add_note(
                    f"pippy: stage {self.index} has tensor-parallel (DTensor) parameters, and its graph was traced with "
                    "the full model's sizes. A traced size that depends on a sharded dimension (a head count fixed "
                    "in a reshape or expand, e.g. repeat_kv when num_key_value_heads < num_attention_heads) does "
                    "not match the local shard. Expected sizes written as -1 in the model code; use a model whose "
                    "reshapes infer the head count, or shard fewer projections"
                )
            traced = {m.dtype for m in (*self.info.input_meta, *self.info.outputs)
                      if m.dtype is not None and m.dtype.is_floating_point}
            params = {p.dtype for p in self.submod.parameters() if p.dtype.is_floating_point}
            if ("dtype" in str(exc) or "scalar type" in str(exc)) and traced and params and not params & traced \
                    and not torch.is_autocast_enabled(self.device.type):  # autocast computes in other dtypes by design
                exc.add_note(
                    f"pippy: stage {self.index}'s parameters are {sorted(map(str, params))} but its graph was traced "
                    f"computing in {sorted(map(str, traced))} (pipeline(compute_dtype=...), or the model cast after "
                    "tracing). compute_dtype is for FSDP2's MixedPrecisionPolicy(param_dtype=...), which casts the "
                    "parameters before each forward; without FSDP2, trace and step inside torch.autocast, or cast "
                    "the model before pipeline()"
                )
            raise

    def output(self, mb: int, j: int) -> Any:
        """Output ``j`` of micro-batch ``mb`` (kept until its backward, or, forward-only, its last reader)."""
        return self._get(mb, "F").outputs[j]

    def held_outputs(self, mb: int) -> list[Any]:
        """Micro-batch ``mb``'s outputs (and loss) still held for its backward; empty when none."""
        st = self._state.get(mb)
        if st is None:
            return []
        return [*st.outputs, *([st.loss] if st.loss is not None else [])]

    def release(self, mb: int) -> None:
        """One reader of forward-only micro-batch ``mb``'s outputs is done; free them after the last."""
        st = self._state.get(mb)
        if st is not None and not st.training:
            st.readers -= 1
            if st.readers <= 0:
                del self._state[mb]

    def set_loss(self, mb: int, loss: torch.Tensor) -> None:
        """Attach the (already scaled) loss of micro-batch ``mb``; the last stage's backward starts there."""
        self._get(mb, "B").loss = loss

    def _get(self, mb: int, action: str) -> _MbState:
        st = self._state.get(mb)
        if st is None:
            raise StageError(f"{self.where(mb, action)}: no forward state for this micro-batch (was F run first?)")
        return st

    def clear(self) -> None:
        """Drop all per-micro-batch state (e.g. after an error)."""
        self._state.clear()
        self._compiled_backward = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(index={self.index}, of={self.num_stages}, device={self.device})"


def _as_tuple(out: Any) -> tuple[Any, ...]:
    """A stage's outputs as a tuple: a traced stage returns one already; a hand-written module may return one tensor."""
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)

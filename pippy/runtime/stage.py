"""One pipeline stage at run time: forward, input-grad and weight-grad per micro-batch; knows no schedule.

    >>> # stage = PipelineStage(pipe, rank, torch.device("cpu"))
    >>> # out = stage(x) if rank == 0 else stage()      # forward-only pipeline of pipe.num_chunks
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from pippy.frontend.params import is_lifted_constant, tensor_at
from pippy.frontend.split import StageInfo

if TYPE_CHECKING:
    from pippy.frontend.pipe import Pipe

__all__ = ["PipelineStage", "StageError"]


class StageError(RuntimeError):
    """A stage was used wrongly; the message names stage, rank, micro-batch and action."""


@dataclass(slots=True)
class _MbState:
    inputs: list[Any]
    outputs: tuple[Any, ...]
    taps: list[Any] = field(default_factory=list)
    loss: torch.Tensor | None = None
    saved_bytes: int = 0
    aux: list[Any] = field(default_factory=list)
    roots: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    tap_grads: list[torch.Tensor | None] | None = None


def _materialize(module: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """A copy of ``module`` on ``device`` with its own parameters (aliasing inside it kept).

    Meta tensors (a model built under ``torch.device("meta")``) become NaN placeholders on
    ``device``: fill them with ``pippy.frontend.materialize.materialize_stage``.
    """
    from pippy.frontend.materialize import replace_meta

    mod = copy.deepcopy(module)
    replace_meta(mod, device)
    return mod.to(device)


def _tap_nodes(gm: fx.GraphModule) -> tuple[list[tuple[fx.Node, list[str]]], bool]:
    """Nodes that read a trainable tensor directly (with the FQNs they read), and whether per-op
    weight grads are exact.

    Exact means every trainable tensor is read by one node only; otherwise a weight-grad pass
    from one tap could also reach the tensor through another reader and count a path twice, so
    the stage falls back to a second traversal from the stage outputs.
    """
    readers: dict[int, set[fx.Node]] = {}
    reads: dict[fx.Node, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        obj = tensor_at(gm, str(node.target))
        if isinstance(obj, torch.Tensor) and obj.requires_grad:
            readers.setdefault(id(obj), set()).update(node.users)
            for u in node.users:
                if u.op != "output":  # a tensor sent on as-is (tied, transmit mode) is no tap
                    reads.setdefault(u, []).append(str(node.target))
    exact = all(len(users) == 1 and next(iter(users)).op != "output" for users in readers.values())
    return list(reads.items()), exact


_LINEAR = "aten.linear.default"
_ADDMM = "aten.addmm.default"
_LAYER_NORM = "aten.layer_norm.default"


def _fast_weight_grad(node: fx.Node, gm: fx.GraphModule) -> tuple[str, fx.Node, str, str | None, float] | None:
    """For ``linear(x, W, b)`` / ``addmm(b, x, W)`` reading trainable W (and b): (kind, x, W fqn, b fqn).

    Their weight gradients are one matmul and one sum from the saved input and the output grad,
    which is much cheaper than another autograd pass; anything else goes through autograd.
    """
    def param(a: Any) -> str | None:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            t = tensor_at(gm, str(a.target))
            if isinstance(t, nn.Parameter) and t.requires_grad:
                return str(a.target)
        return None

    if node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    if str(node.target) == _LINEAR and len(node.args) >= 2:
        w = param(node.args[1])
        b = param(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
        if w is not None and (len(node.args) < 3 or node.args[2] is None or b is not None):
            return ("linear", node.args[0], w, b, 0.0)
    if str(node.target) == _ADDMM and len(node.args) == 3 and isinstance(node.args[1], fx.Node):
        w, b = param(node.args[2]), param(node.args[0])
        if w is not None and b is not None and tensor_at(gm, b).dim() == 1:
            return ("addmm", node.args[1], w, b, 0.0)
    if str(node.target) == _LAYER_NORM and len(node.args) >= 4 and len(node.args[1]) == 1:  # type: ignore[arg-type]
        w, b = param(node.args[2]), param(node.args[3])
        if w is not None and b is not None:
            eps = float(node.args[4]) if len(node.args) > 4 else 1e-5  # type: ignore[arg-type]
            return ("layer_norm", node.args[0], w, b, eps)
    return None


def _with_taps(gm: fx.GraphModule, taps: list[fx.Node]) -> fx.GraphModule:
    """A copy of ``gm`` that also returns the values of ``taps`` (after the normal outputs)."""
    g = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in g.nodes}
    out = next(n for n in g.nodes if n.op == "output")
    out.args = ((*out.args[0], *(by_name[t.name] for t in taps)),)
    return fx.GraphModule(gm, g)


class _SavedBytes:
    """saved_tensors_hooks pair counting the bytes autograd keeps, each storage once, parameters excluded."""

    def __init__(self, skip: set[int]) -> None:
        self.seen = set(skip)
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.seen:
            self.seen.add(ptr)
            self.total += t.untyped_storage().nbytes()
        # a detached alias (same storage, no grad_fn): returning ``t`` itself would make a saved
        # output and its own graph node a C++ reference cycle that only a backward breaks, so a
        # micro-batch dropped without one (a failed step, ``clear()``) would leak its activations
        return t.detach()

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        return t


def _accumulate(p: nn.Parameter, g: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = g
    else:
        p.grad += g


def _linear_weight_grad(
    fast: tuple[str, nn.Parameter, nn.Parameter | None, float], x: torch.Tensor, g: torch.Tensor
) -> None:
    """dW, db of ``linear`` (W: [out, in]), ``addmm`` (W: [in, out]) or ``layer_norm`` from input ``x`` and output grad ``g``."""
    kind, w, b, eps = fast
    with torch.no_grad():
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.detach().reshape(-1, x.shape[-1])
        if kind == "layer_norm":  # dW = sum(g * x_hat), db = sum(g); x_hat recomputed from x (cheap)
            var, mean = torch.var_mean(x2, dim=-1, keepdim=True, correction=0)
            _accumulate(w, (g2 * ((x2 - mean) * torch.rsqrt(var + eps))).sum(0))
        else:
            _accumulate(w, g2.t().mm(x2) if kind == "linear" else x2.t().mm(g2))
        if b is not None:
            _accumulate(b, g2.sum(0))


def _grad_leaves(values: list[Any]) -> list[torch.Tensor]:
    """Tensor leaves of ``values`` that carry autograd history (or all of them, in order, when flattened)."""
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(values) if isinstance(t, torch.Tensor) and t.requires_grad]


class PipelineStage:
    """Stage ``stage_index`` of ``pipe`` on ``device``: its module and per-micro-batch state.

    Calling it runs a forward-only pipeline of ``pipe.num_chunks`` micro-batches over all ranks of
    ``group`` (one stage per rank): ``stage(x)`` on the first rank, ``stage()`` on the others; the
    last rank gets the merged output, the others ``None``.

        >>> # stage = PipelineStage(pipe, dist.get_rank(), torch.device("cpu"))
    """

    def __init__(self, pipe: Pipe, stage_index: int, device: torch.device | str = "cpu", group: Any = None) -> None:
        pipe._check_index(stage_index)
        self.pipe = pipe
        self.index = stage_index
        self.device = torch.device(device)
        self.group = group
        self.info: StageInfo = pipe.stage_infos[stage_index]
        self.submod: fx.GraphModule = _materialize(self.info.module, self.device)
        self._tapped: fx.GraphModule | None = None
        self._tap_params: list[list[nn.Parameter]] = []
        self._tap_fast: list[tuple[str, nn.Parameter, nn.Parameter | None, float] | None] = []
        self._n_taps = 0
        self._exact_w = False
        self._state: dict[int, _MbState] = {}
        self.measure_activations = False  # count bytes autograd saves per micro-batch (small overhead)
        self.rank_hint: int | None = None  # set by the executor, for messages

    # ----------------------------------------------------------------- properties
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

    def parameters(self) -> Any:
        """This stage's parameters (for an optimizer)."""
        return self.submod.parameters()

    def state_dict(self) -> dict[str, Any]:
        """This stage's state, keyed by the original model's FQNs (export's lifted constants left out)."""
        return {k: v for k, v in self.submod.state_dict().items() if not is_lifted_constant(k)}

    def live_microbatches(self) -> int:
        """Micro-batches whose activations this stage still holds."""
        return len(self._state)

    def _where(self, mb: int, action: str) -> str:
        rank = "?" if self.rank_hint is None else str(self.rank_hint)
        return f"stage {self.index} (rank {rank}), micro-batch {mb}, action {self.index}{action}{mb}"

    # ----------------------------------------------------------------- compute
    def forward(self, mb: int, inputs: Sequence[Any], *, training: bool, split_backward: bool = False) -> tuple[Any, ...]:
        """Run the stage on one micro-batch; keep what backward needs when ``training``."""
        if len(inputs) != len(self.info.inputs):
            raise StageError(
                f"{self._where(mb, 'F')}: expected {len(self.info.inputs)} inputs "
                f"({', '.join(self.info.input_names)}), got {len(inputs)}"
            )
        if not training:
            with torch.no_grad():
                return tuple(self.submod(*inputs))
        if mb in self._state:
            raise StageError(f"{self._where(mb, 'F')}: forward ran twice for this micro-batch without a backward")
        leaves = []
        for x, meta in zip(inputs, self.info.input_meta):
            if isinstance(x, torch.Tensor):
                x = x.detach().requires_grad_(meta.requires_grad)
            leaves.append(x)
        if split_backward and self._tapped is None:
            taps, self._exact_w = _tap_nodes(self.submod)
            fast = [_fast_weight_grad(n, self.submod) if self._exact_w else None for n, _ in taps]
            aux = [f[1] for f in fast if f is not None]  # inputs of linear/addmm, already saved by autograd
            self._tapped = _with_taps(self.submod, [n for n, _ in taps] + aux)
            self._n_taps = len(taps)
            self._tap_params = [[self.submod.get_parameter(f) for f in fqns] for _, fqns in taps]
            self._tap_fast = [
                None
                if f is None
                else (f[0], self.submod.get_parameter(f[2]), None if f[3] is None else self.submod.get_parameter(f[3]), f[4])
                for f in fast
            ]
        fn = self._tapped if split_backward and self._tapped is not None else self.submod
        if self.measure_activations:
            counter = _SavedBytes({p.untyped_storage().data_ptr() for p in self.submod.parameters()})
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                res = tuple(fn(*leaves))
        else:
            res = tuple(fn(*leaves))
        n_out = len(self.info.outputs)
        outs = res[:n_out]
        extra = list(res[n_out:])
        self._state[mb] = _MbState(leaves, outs, extra[: self._n_taps] if fn is self._tapped else extra)
        if fn is self._tapped:
            self._state[mb].aux = extra[self._n_taps :]
        if self.measure_activations:
            self._state[mb].saved_bytes = counter.total
        return outs

    def live_activation_bytes(self) -> int:
        """Bytes autograd saved for the live micro-batches (0 unless ``measure_activations`` is set).

        Counts each storage once per micro-batch and leaves parameters out, so it is the
        activation memory the schedule keeps alive, comparable with the simulator's memory model.
        """
        return sum(st.saved_bytes for st in self._state.values())

    def set_loss(self, mb: int, loss: torch.Tensor) -> None:
        """Attach the (already scaled) loss of micro-batch ``mb``; the last stage's backward starts there."""
        self._get(mb, "B").loss = loss

    def output(self, mb: int, j: int) -> Any:
        """Output ``j`` of micro-batch ``mb`` (kept until its backward)."""
        return self._get(mb, "F").outputs[j]

    def _get(self, mb: int, action: str) -> _MbState:
        st = self._state.get(mb)
        if st is None:
            raise StageError(f"{self._where(mb, action)}: no forward state for this micro-batch (was F run first?)")
        return st

    def _roots(self, mb: int, st: _MbState, grads: Sequence[torch.Tensor | None] | None) -> tuple[list, list]:
        if st.loss is not None:
            return [st.loss], [torch.ones_like(st.loss)]
        outs, gs = [], []
        for j, o in enumerate(st.outputs):
            g = grads[j] if grads is not None and j < len(grads) else None
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None:
                if g.shape != o.shape:
                    raise StageError(
                        f"{self._where(mb, 'B')}: gradient for output {j} ({self.info.output_names[j]}) has shape "
                        f"{list(g.shape)}, expected {list(o.shape)}"
                    )
                outs.append(o)
                gs.append(g)
        return outs, gs

    def _input_grads(self, st: _MbState) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for x, meta in zip(st.inputs, self.info.input_meta):
            if not meta.requires_grad:
                out.append(None)
            elif isinstance(x, torch.Tensor) and x.grad is not None:
                out.append(x.grad)
            else:
                out.append(torch.zeros_like(x) if isinstance(x, torch.Tensor) else None)
        return out

    def backward(self, mb: int, grads: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
        """Full backward (B) of ``mb``: accumulate parameter grads, return the input grads."""
        st = self._get(mb, "B")
        outs, gs = self._roots(mb, st, grads)
        if outs:
            torch.autograd.backward(outs, gs)
        res = self._input_grads(st)
        del self._state[mb]
        return res

    def backward_input(self, mb: int, grads: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
        """Input-gradient backward (I) of ``mb``; the weight part waits for :meth:`backward_weight`."""
        st = self._get(mb, "I")
        outs, gs = self._roots(mb, st, grads)
        st.roots = (outs, gs)
        want = [x for x, m in zip(st.inputs, self.info.input_meta) if m.requires_grad and isinstance(x, torch.Tensor)]
        tap_leaves = _grad_leaves(st.taps) if self._exact_w else []
        targets = want + tap_leaves
        if outs and targets:
            # the graph is needed again in W only for weights without a closed-form gradient
            retain = not (self._exact_w and all(f is not None for f in self._tap_fast))
            got = torch.autograd.grad(outs, targets, gs, retain_graph=retain, allow_unused=True)
            for x, g in zip(want, got[: len(want)]):
                x.grad = g
            st.tap_grads = list(got[len(want) :])
        return self._input_grads(st)

    def backward_weight(self, mb: int) -> None:
        """Weight-gradient backward (W) of ``mb``: accumulate parameter grads, free the micro-batch."""
        st = self._get(mb, "W")
        if st.roots is None:
            raise StageError(f"{self._where(mb, 'W')}: W ran before I for this micro-batch")
        outs, gs = st.roots
        params = [p for p in self.submod.parameters() if p.requires_grad]
        if self._exact_w and st.tap_grads is not None:
            grads = iter(st.tap_grads)
            aux = iter(st.aux)
            for tap, tparams, fast in zip(st.taps, self._tap_params, self._tap_fast):
                leaves = _grad_leaves([tap])
                pairs = [(t, g) for t, g in zip(leaves, [next(grads) for _ in leaves]) if g is not None]
                x = next(aux) if fast is not None else None
                if pairs and fast is not None and isinstance(x, torch.Tensor):
                    _linear_weight_grad(fast, x, pairs[0][1])
                elif pairs:  # one call per reader: only its own parameters, so no path counts twice
                    torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs], inputs=tparams)
        elif outs and params:
            torch.autograd.backward(outs, gs, inputs=params)
        del self._state[mb]

    def clear(self) -> None:
        """Drop all per-micro-batch state (e.g. after an error)."""
        self._state.clear()

    # ----------------------------------------------------------------- forward-only pipeline
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from pippy.runtime.api import run_forward_pipeline

        return run_forward_pipeline(self, args, kwargs)

    def __repr__(self) -> str:
        return f"PipelineStage(index={self.index}, of={self.num_stages}, device={self.device})"


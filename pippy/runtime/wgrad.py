"""Weight-gradient taps: a stage forward that also returns what the W pass (weight gradients) needs.

A split backward runs I (input gradients) first and W (weight gradients) later. For W, the
forward returns, after the stage outputs, every node that reads a trainable tensor (a "tap"); I
then asks autograd for the gradients at those taps too, and W turns them into weight gradients
one reader at a time. ``linear``, ``addmm`` and ``layer_norm`` get theirs in closed form from the
saved input (one matmul or reduction, no second autograd pass; ``group_norm`` too), unless the op's output or input
is overwritten in place later (``pippy.frontend.mutation``); anything else runs a small backward
from its tap to its own parameters (through the in-place ops that rewrote the tap, if any).
``group_norm`` never takes that small backward: torch's backward to its weights alone crashes the
process on a channels_last input. Its tap is the gradient edge recorded right after the op, which
in-place writes later do not move, and a stage with a ``group_norm`` reader lacking a closed form
takes one backward that asks for its inputs' gradients too (:func:`one_pass_inputs`).

    >>> import torch
    >>> from pippy import pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.LayerNorm(2))
    >>> stage_module = pipeline(net, 1, (torch.ones(1, 3),)).get_stage_module(0)
    >>> taps = WeightGradTaps(stage_module)              # linear and layer_norm read the weights
    >>> taps.num_taps, taps.exact, [f.kind for f in taps.forms if f is not None], taps.closed_form
    (2, True, ['linear', 'layer_norm'], True)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.autograd.graph import get_gradient_edge

from pippy.frontend.mutation import written_after
from pippy.frontend.params import tensor_at

__all__ = ["ClosedForm", "WeightGradTaps", "one_pass_inputs"]

_LINEAR = "aten.linear.default"
_ADDMM = "aten.addmm.default"
_LAYER_NORM = "aten.layer_norm.default"
_GROUP_NORM = "aten.group_norm.default"
_GROUP_NORMS = (_GROUP_NORM, "aten.native_group_norm.default")


@dataclass(frozen=True, slots=True)
class ClosedForm:
    """A tap whose weight gradient has a closed form: ``kind`` is linear, addmm, layer_norm or group_norm.
    ``weight`` is None only for a group_norm whose weight is frozen (its bias trains).

        >>> ClosedForm("linear", torch.nn.Parameter(torch.ones(2, 2)), None).kind
        'linear'
    """

    kind: str
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    eps: float = 0.0
    groups: int = 1  # group_norm's

    def accumulate(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add dW, db from the op's input ``x`` and output gradient ``g`` into ``.grad``.

        ``linear`` stores W as [out, in], ``addmm`` as [in, out]; ``layer_norm`` recomputes the
        normalized input from ``x`` (cheap) for dW = sum(g * x_hat), db = sum(g).

            >>> w = torch.nn.Parameter(torch.zeros(2, 3))
            >>> ClosedForm("linear", w, None).accumulate(torch.ones(4, 3), torch.ones(4, 2))
            >>> w.grad.tolist()
            [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
        """
        with torch.no_grad():
            if self.kind == "group_norm":  # per channel (dim 1): dW = sum(g * x_hat), db = sum(g)
                dims = [d for d in range(g.dim()) if d != 1]
                if self.weight is not None:
                    x_hat = torch.nn.functional.group_norm(x.detach(), self.groups, eps=self.eps)
                    _add_grad(self.weight, (g * x_hat).sum(dims))
                if self.bias is not None:
                    _add_grad(self.bias, g.sum(dims))
                return
            assert self.weight is not None, f"{self.kind}: only group_norm's closed form takes a frozen weight"
            g2 = g.reshape(-1, g.shape[-1])
            x2 = x.detach().reshape(-1, x.shape[-1])
            if self.kind == "layer_norm":
                var, mean = torch.var_mean(x2, dim=-1, keepdim=True, correction=0)
                _add_grad(self.weight, (g2 * ((x2 - mean) * torch.rsqrt(var + self.eps))).sum(0))
            else:
                _add_grad(self.weight, g2.t().mm(x2) if self.kind == "linear" else x2.t().mm(g2))
            if self.bias is not None:
                _add_grad(self.bias, g2.sum(0))


def _add_grad(p: nn.Parameter, g: torch.Tensor) -> None:
    if g.dtype != p.dtype:  # under autocast the op ran on a cast copy (bf16): autograd casts its grad back too
        g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g
    else:
        p.grad += g


def grad_leaves(values: Sequence[Any]) -> list[torch.Tensor]:
    """Tensor leaves of ``values`` that carry autograd history, in flattening order.

        >>> grad_leaves([torch.ones(1, requires_grad=True), 3, (torch.ones(1),)])
        [tensor([1.], requires_grad=True)]
    """
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(list(values)) if isinstance(t, torch.Tensor) and t.requires_grad]


class WeightGradTaps:
    """The tapped copy of a stage module and the weight-gradient pass over its taps.

    ``exact`` says whether per-tap weight gradients are exact: every trainable tensor is read by
    one node only. Otherwise a pass from one tap could reach a tensor through another reader too
    and count a path twice, and the stage falls back to one backward from its outputs.
    ``closed_form`` says whether every tap has a closed form, so that I may free the graph.

        >>> from pippy import pipeline
        >>> gm = pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),)).get_stage_module(0)
        >>> WeightGradTaps(gm).num_taps
        1
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        taps, self.exact = _tap_nodes(gm)
        found = [_closed_form_of(n, gm) if self.exact else None for n, _ in taps]
        # a closed form needs the op's own input and output gradient: the input may not be overwritten in place
        # later, nor the output (``y = linear(x); y.relu_()`` makes I's gradient at y the one after the ReLU),
        # except a group_norm's, whose tap is then the edge recorded right after it (the gradient before the write)
        found = [None if f is None or written_after(f[1], after=n) or (written_after(n) and f[0] != "group_norm")
                 else f for f, (n, _) in zip(found, taps)]
        edge_now = [n for f, (n, _) in zip(found, taps) if f is not None and written_after(n)]
        if any(f is None and str(n.target) in _GROUP_NORMS for f, (n, _) in zip(found, taps)):
            # its small backward to the weights alone would crash torch on a channels_last input: one backward
            # for the stage instead, which asks for the inputs' gradients too (``one_pass_inputs``)
            self.exact, found = False, [None] * len(taps)
        aux = [f[1] for f in found if f is not None]  # inputs of the closed-form ops, already saved by autograd
        self.module = _with_outputs(gm, [n for n, _ in taps], aux, edge_now)
        self.num_taps = len(taps)
        self.params: list[list[nn.Parameter]] = [[gm.get_parameter(f) for f in fqns] for _, fqns in taps]
        self.forms: list[ClosedForm | None] = [
            None if f is None else ClosedForm(
                f[0], None if f[2] is None else gm.get_parameter(f[2]),
                None if f[3] is None else gm.get_parameter(f[3]), f[4], f[5]
            )
            for f in found
        ]
        self.closed_form = self.exact and all(f is not None for f in self.forms)

    def split(self, res: Sequence[Any], n_out: int) -> tuple[tuple[Any, ...], list[list[Any]], list[Any]]:
        """Cut the tapped module's results into (stage outputs, tap edges, closed-form inputs).

        A tap is kept as the gradient edges of its values (``get_gradient_edge``): I differentiates
        to them and W starts from them, and neither needs the values themselves, which would
        otherwise stay alive from F to I where autograd does not save them (a linear's output that
        only a residual add reads).
        """
        extra = list(res[n_out:])
        edges = [tap.edges if isinstance(tap, _Edges) else [get_gradient_edge(t) for t in grad_leaves([tap])]
                 for tap in extra[: self.num_taps]]
        return tuple(res[:n_out]), edges, extra[self.num_taps :]

    def slim(self, taps: Sequence[Any], aux: Sequence[Any]) -> list[Any]:
        """After I: a closed-form tap's values are no longer read (its W needs only the op's input and
        the gradient I computed), so keep just how many gradients it has and free the tensors."""
        inputs = iter(aux)
        return [len(t) if f is not None and isinstance(next(inputs), torch.Tensor) else t
                for t, f in zip(taps, self.forms)]

    def weight_grads(self, taps: Sequence[Any], tap_grads: Sequence[torch.Tensor | None], aux: Sequence[Any]) -> None:
        """Accumulate every parameter's gradient from the gradients I computed at the taps (each tap its
        gradient edges from :meth:`split`, or their count after :meth:`slim`)."""
        grads = iter(tap_grads)
        inputs = iter(aux)
        for tap, params, form in zip(taps, self.params, self.forms):
            leaves: list[Any] = [None] * tap if isinstance(tap, int) else list(tap)
            pairs = [(t, g) for t, g in zip(leaves, [next(grads) for _ in leaves]) if g is not None]
            x = next(inputs) if form is not None else None
            if pairs and form is not None and isinstance(x, torch.Tensor):
                form.accumulate(x, pairs[0][1])
            elif pairs:  # one call per reader: only its own parameters, so no path counts twice
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs], inputs=params)


def _tap_nodes(gm: fx.GraphModule) -> tuple[list[tuple[fx.Node, list[str]]], bool]:
    """Nodes that read a trainable tensor directly (with the FQNs they read), and whether per-op
    weight grads are exact (each trainable tensor read by one node only)."""
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


def _closed_form_of(
    node: fx.Node, gm: fx.GraphModule
) -> tuple[str, fx.Node, str | None, str | None, float, int] | None:
    """For ``linear(x, W, b)`` / ``addmm(b, x, W)`` / ``layer_norm(x, shape, W, b, eps)`` /
    ``group_norm(x, groups, W, b, eps)`` reading trainable W (and b): (kind, x, W fqn, b fqn, eps, groups);
    None for anything else. (group_norm's also avoids torch's crash in its backward to the weights alone
    on a channels_last input.)"""

    def param(a: Any) -> str | None:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            t = tensor_at(gm, str(a.target))
            if isinstance(t, nn.Parameter) and t.requires_grad:
                return str(a.target)
        return None

    if node.kwargs or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    target = str(node.target)
    if target == _LINEAR and len(node.args) >= 2:
        w = param(node.args[1])
        has_b = len(node.args) > 2 and node.args[2] is not None
        b = param(node.args[2]) if has_b else None
        if w is not None and (not has_b or b is not None):
            return ("linear", node.args[0], w, b, 0.0, 1)
    if target == _ADDMM and len(node.args) == 3 and isinstance(node.args[1], fx.Node):
        w, b = param(node.args[2]), param(node.args[0])
        if w is not None and b is not None and tensor_at(gm, b).dim() == 1:
            return ("addmm", node.args[1], w, b, 0.0, 1)
    if target == _LAYER_NORM and len(node.args) >= 4 and len(node.args[1]) == 1:  # type: ignore[arg-type]
        w, b = param(node.args[2]), param(node.args[3])
        if w is not None and b is not None:
            eps = float(node.args[4]) if len(node.args) > 4 else 1e-5  # type: ignore[arg-type]
            return ("layer_norm", node.args[0], w, b, eps, 1)
    if target == _GROUP_NORM and len(node.args) >= 4 and isinstance(node.args[1], int):
        w, b = param(node.args[2]), param(node.args[3])  # dW needs no b, db no W: either may be frozen
        if w is not None or b is not None:
            eps = float(node.args[4]) if len(node.args) > 4 else 1e-5  # type: ignore[arg-type]
            return ("group_norm", node.args[0], w, b, eps, node.args[1])
    return None


class _Edges:
    """The gradient edges of a value as it was when recorded (in-place writes later give the value new ones)."""

    __slots__ = ("edges",)

    def __init__(self, edges: list[Any]) -> None:
        self.edges = edges


def _edges_now(t: Any) -> _Edges:
    return _Edges([get_gradient_edge(t)] if isinstance(t, torch.Tensor) and t.requires_grad else [])


def _with_outputs(gm: fx.GraphModule, taps: list[fx.Node], aux: list[fx.Node], edge_now: list[fx.Node]) -> fx.GraphModule:
    """A copy of ``gm`` that also returns the values of ``taps`` and ``aux`` (after the normal outputs); for a
    tap in ``edge_now``, its gradient edges recorded right after it runs instead (an :class:`_Edges`)."""
    g = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in g.nodes}
    out = next(n for n in g.nodes if n.op == "output")
    recorded = {}
    for n in edge_now:
        with g.inserting_after(by_name[n.name]):
            recorded[n.name] = g.call_function(_edges_now, (by_name[n.name],))
    new = [recorded.get(t.name, by_name[t.name]) for t in taps] + [by_name[t.name] for t in aux]
    out.args = ((*out.args[0], *new),)
    return fx.GraphModule(gm, g)


def one_pass_inputs(module: nn.Module, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """The inputs needing a gradient that a stage's one-backward W pass asks for besides its parameters, when
    ``module`` may run a group norm (none otherwise): torch's backward to a group norm's weights alone, its input's
    gradient unasked, crashes the process on a channels_last input; with every leaf asked for, it is computed.

        >>> x = torch.ones(1, 2, 3, 3, requires_grad=True)
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), torch.nn.GroupNorm(2, 4))
        >>> [t is x for t in one_pass_inputs(net, [x, 3, torch.ones(1)])], one_pass_inputs(torch.nn.Linear(2, 2), [x])
        ([True], [])
    """
    for m in module.modules():  # traced graphs (unflattened ones too: their modules hold graphs) and GroupNorm modules
        graph = getattr(m, "graph", None)
        if isinstance(m, nn.GroupNorm) or (isinstance(graph, fx.Graph) and any(
                n.op == "call_function" and str(n.target) in _GROUP_NORMS for n in graph.nodes)):
            return [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    return []

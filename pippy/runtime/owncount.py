"""A model's own mean class-index loss (``ignore_index``, class ``weight=``): what each micro-batch counts.

``F.cross_entropy(logits, labels)`` inside ``forward`` (Hugging Face models given ``labels=``) averages over the
targets that are not ``ignore_index``, each weighing its class's weight when the loss has ``weight=``. A pipeline
averages the micro-batches' means, each with weight ``1/m``, so when micro-batches count different totals (padding,
masked prompts, MLM masks, classes of other weights), the loss it returns and the gradients it trains on differ
from the full batch's. This module reads a micro-batch's count off the last stage's graph: the ops from its inputs
to the loss's target (and to the weight, read from the running stage at each count), copied into a small graph.
:mod:`pippy.runtime.ownscale` weighs the micro-batches by it; where that cannot be exact, the counter warns once,
on the first micro-batch whose count differs from micro-batch 0's.

    >>> import torch, warnings
    >>> from pippy import pipeline
    >>> from pippy.runtime.stage import Stage
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(3, 5)
    ...     def forward(self, x, labels):
    ...         return torch.nn.functional.cross_entropy(self.fc(x), labels)
    >>> x, labels = torch.randn(4, 3), torch.tensor([1, 2, -100, -100])
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     stage = Stage(pipeline(Net(), 2, (x, labels)), 0)
    >>> counter = OwnLossCounts.of(stage.submod)
    >>> [int(c) for c in counter.counts([x[:2], labels[:2]])], [int(c) for c in counter.counts([x[2:], labels[2:]])]
    ([2], [0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from pippy.frontend.inline import inline_regions
from pippy.frontend.modebranch import is_random
from pippy.frontend.notice import warn_user
from pippy.frontend.reducechain import CHAIN_OPS, aten_arg, aten_op
from pippy.frontend.retarget import retarget_devices
from pippy.runtime.loss import loss_index
from pippy.runtime.stageerror import StageError

__all__ = ["OwnLossCounts", "show_count"]

_LOSSES = {"cross_entropy_loss", "nll_loss", "nll_loss_nd", "nll_loss2d"}
_CHECKS = 16  # micro-batch comparisons (each one host sync) before the check stops: a batch's padding shows early


def _mean_losses(gm: fx.GraphModule) -> list[tuple[int, fx.Node]]:
    """The mean-reduced class-index loss ops the outputs of ``gm`` are (up to copies, reshapes and scaling), each
    with the flat index of the first output that is it."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    found: dict[fx.Node, int] = {}
    for k, node in enumerate(_leaves(out.args)):
        for _ in range(32):
            name, schema = aten_op(node)
            if name in _LOSSES:
                if aten_arg(node, schema, "reduction") == 1:
                    found.setdefault(node, k)
                break
            if name not in CHAIN_OPS or not node.args or not isinstance(node.args[0], fx.Node):
                break
            node = node.args[0]
    return [(k, node) for node, k in found.items()]


def _leaves(args: Any) -> list[fx.Node]:
    nodes: list[fx.Node] = []
    fx.node.map_arg(args, nodes.append)
    return nodes


class OwnLossCounts:
    """Counts of the targets a stage module's own mean losses average over, per call on the stage's inputs.

    ``of(module)`` is None when the module returns no such loss, or when a loss's target (or weight) is computed
    by a submodule call (then only the full graph could tell; nothing is checked).
    """

    def __init__(self, module: fx.GraphModule, names: list[str], positions: list[int]) -> None:
        self.module, self.names, self.positions = module, names, positions
        self.attrs: list[tuple[str, Any]] = []  # the stage's tensors the counts read (class weights): name, traced
        self.weighted: list[bool] = [False] * len(names)  # per loss: a count of class weights
        self.plain: list[torch.Tensor] = []  # the last call's plain target counts of the weighted losses
        self.checks = 0
        self.traced: torch.device | None = None  # the device the pipe was traced on (its constants name it)
        self._on: torch.device | None = None  # the device the constants name now
        self._first: list[torch.Tensor] | None = None

    @classmethod
    def of(cls, module: Any) -> OwnLossCounts | None:
        """The counter for ``module`` (a traced stage's graph module), or None."""
        if not isinstance(module, fx.GraphModule):
            return None
        module = inline_regions(module)  # a loss computed under torch.autocast in forward
        losses = _mean_losses(module)
        if not losses:
            return None
        chains: list[tuple[list[fx.Node], fx.Node, Any, fx.Node | None]] = []
        names: list[str] = []
        positions: list[int] = []
        attrs: dict[fx.Node, None] = {}  # the stage's tensors the counts read, in order
        for k, loss in losses:
            name, schema = aten_op(loss)
            target, ignore = aten_arg(loss, schema, "target"), aten_arg(loss, schema, "ignore_index")
            weight = aten_arg(loss, schema, "weight")
            if not _class_index(target):
                weight = None  # class probabilities: the mean is over samples, weights or not
            read: dict[fx.Node, None] = {}
            chain = _chain([target], read)  # a target computed by the model itself (pseudo-labels): not counted
            if chain is not None and weight is not None:
                extra = _chain([weight], read, tensors=True)
                chain = None if extra is None else sorted({*chain, *extra}, key=_position(target))
            if chain is None or not all(isinstance(_attr(module, str(n.target)), torch.Tensor) for n in read):
                continue  # (a torch.cond's branch is a get_attr of a graph, not a tensor)
            attrs.update(read)
            chains.append((chain, target, ignore, weight))
            names.append(f"{name} (ignore_index={ignore}" + (", class weights)" if weight is not None else ")"))
            positions.append(k)
        if not chains:
            return None
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in module.graph.nodes:
            if node.op == "placeholder":
                env[node] = graph.node_copy(node)
        for node in attrs:  # read from the running stage at each count (its device, its loaded values)
            env[node] = graph.placeholder(f"attr_{len(env)}")
        outs = []
        for chain, target, ignore, weight in chains:
            for node in chain:
                if node not in env:
                    env[node] = graph.node_copy(node, lambda n: env[n])
            outs.append(_count(graph, env[target], ignore, None if weight is None else env[weight]))
        weighted = [w is not None for _, _, _, w in chains]
        plain = [_count(graph, env[t], ignore, None) for _, t, ignore, w in chains if w is not None]
        graph.output(tuple(outs + plain))  # then, for the weighted losses, their plain counts of targets
        counter = cls(fx.GraphModule(module, graph), names, positions)
        counter.attrs = [(str(node.target), _attr(module, str(node.target))) for node in attrs]
        counter.weighted = weighted
        return counter

    @classmethod
    def of_pipe(cls, pipe: Any) -> tuple[OwnLossCounts | None, bool]:
        """The counter of a traced pipe's last stage, and whether training on it is made exact
        (:mod:`pippy.runtime.ownscale`): the model returns one such loss, as its own loss output. Otherwise (several
        such losses, a ``(loss, logits)`` tuple) uneven counts are only warned about. The same on every rank."""
        counter = None if getattr(pipe, "manual", False) else cls.of(pipe.stage_infos[-1].module)
        if counter is None:
            return None, False
        counter.traced = getattr(pipe, "traced_device", None)
        return counter, counter.positions == [loss_index(pipe.out_spec, pipe.stage_infos[-1].outputs)]

    def counts(self, inputs: Sequence[Any], source: Any = None) -> list[torch.Tensor]:
        """Each loss's count of targets on one micro-batch's stage inputs (a float sum of class weights for a loss
        with ``weight=``, read from ``source``: the stage's running module). Device constants the trace baked in (a
        model traced on ``meta``: ``labels.to(logits.device)``) follow the inputs' device, as the stages' do."""
        device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)
        if device is not None and device != self._on:
            retarget_devices(self.module, [d for d in (self.traced, torch.device("meta"), self._on) if d], device)
            self._on = device
        tensors = []
        for name, traced in self.attrs:
            t = _attr(source, name) if source is not None else None
            t = traced if not isinstance(t, torch.Tensor) else t
            t = t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor (sharded parameter)
            tensors.append(t.detach() if device is None else t.detach().to(device))
        with torch.no_grad():
            out = list(self.module(*inputs, *tensors))
        self.plain = out[len(self.names):]
        return out[:len(self.names)]

    def check_weights(self, count: torch.Tensor, where: str) -> None:
        """Refuse a micro-batch (the last counted) whose targets of the first loss all weigh 0: the loss op's
        backward divides by their summed weight, so its gradients would be NaN (the full batch's are not). One
        host read per micro-batch, for a loss with class weights only."""
        if not self.weighted or not self.weighted[0] or not self.plain:
            return
        targets = int(self.plain[0])
        if targets > 0 and not bool(count > 0):
            raise StageError(
                f"{where}: the model's own loss, {self.names[0]}, weighs each target by its class's weight, and this "
                f"micro-batch's {targets} counted targets all weigh 0; expected a positive summed weight. The loss "
                "op's backward divides by that sum, so this micro-batch's gradients would be NaN where the full "
                "batch's are finite. How to fix: mark such targets with ignore_index (skipped exactly) instead of a "
                "class weight of 0, or use fewer micro-batches so that each holds a target of positive weight"
            )

    def check(self, mb: int, inputs: Sequence[Any], where: str, loss_fn: bool = False, source: Any = None) -> None:
        """Remember micro-batch 0's counts; warn (and stop checking) when ``mb``'s differ. Bounded host syncs.
        ``loss_fn``: the schedule has one, so the step may train on something else than the model's own loss."""
        first = self._first
        if self.checks >= _CHECKS or (mb != 0 and first is None):
            return
        try:
            counts = self.counts(inputs, source)
        except Exception:  # a check must never stop a step: an op that does not run here (a device fixed in the trace)
            self.checks = _CHECKS
            return
        if mb == 0 or first is None:
            self._first = counts
            return
        self.checks += 1
        for name, c0, c in zip(self.names, first, counts):
            if bool(c0 != c):
                self.checks = _CHECKS
                head = (f"{where}: the model's own loss, {name}, is a mean over the targets it counts, and micro-batch "
                        f"0 counts {show_count(c0)} of them, micro-batch {mb} {show_count(c)}. ")
                if loss_fn:
                    warn_user(head + "The schedule has a loss_fn, so pippy trains on what it returns with equal "
                              "micro-batch weights; if that is this loss, the gradients differ from the full batch's "
                              "(where a micro-batch with fewer targets weighs less). How to fix: pass no loss_fn "
                              "(pippy then trains on the model's own loss exactly), or return the logits and pass "
                              "loss_fn=torch.nn.CrossEntropyLoss(ignore_index=...); the loss the step returns is the "
                              "full batch's either way")
                else:
                    warn_user(head + "A pipeline averages micro-batch means with equal weights, so the loss it "
                              "returns, and the gradients when trained on it, differ from the full batch's (where a "
                              "micro-batch with fewer targets weighs less). How to fix: return the logits and pass "
                              "loss_fn=torch.nn.CrossEntropyLoss(ignore_index=...) to the schedule (exact across "
                              "micro-batches); or, for a Hugging Face model, pass num_items_in_batch= (the batch's "
                              "count of targets; see the README's training section)")
                return


def show_count(count: torch.Tensor) -> str:
    """A count as a user reads it: whole for targets, to 6 digits for a sum of class weights.

        >>> show_count(torch.tensor(3)), show_count(torch.tensor(2.5, dtype=torch.float64))
        ('3', '2.5')
    """
    return f"{count.item():.6g}" if count.is_floating_point() else str(int(count))


def _class_index(target: Any) -> bool:
    """Whether a loss's target holds class indices (its traced value is an integer tensor), not probabilities."""
    val = target.meta.get("val") if isinstance(target, fx.Node) else None
    return not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point


def _position(node: fx.Node) -> Any:
    order = {n: k for k, n in enumerate(node.graph.nodes)}
    return order.__getitem__


def _chain(roots: list[Any], attrs: dict[fx.Node, None], tensors: bool = False) -> list[fx.Node] | None:
    """The ops from the placeholders to ``roots``, in graph order. With ``tensors``, the stage's own tensors (a
    class weight buffer) may be read too, and are added to ``attrs``; without, a chain that reads one (a target
    the model computes from its parameters) or that calls a submodule gives None, as does a root that is no node."""
    if not all(isinstance(r, fx.Node) for r in roots):
        return None
    order: list[fx.Node] = []
    stack, seen = list(roots), set()
    while stack:
        node = stack.pop()
        if node in seen or node.op == "placeholder":
            continue
        seen.add(node)
        if node.op == "get_attr" and tensors:
            attrs.setdefault(node)
            continue
        if node.op != "call_function" or is_random(node):
            return None
        order.append(node)
        stack.extend(_leaves((node.args, node.kwargs)))
    return sorted(order, key=_position(roots[0]))


def _count(graph: fx.Graph, target: fx.Node, ignore: Any, weight: fx.Node | None) -> fx.Node:
    """The graph's ops for a loss's count: its targets that are not ``ignore``, each weighing its class's weight."""
    ops = torch.ops.aten
    ne = graph.call_function(ops.ne.Scalar, (target, ignore))
    if weight is None:
        return graph.call_function(ops.sum.default, (ne,))
    safe = graph.call_function(ops.where.ScalarOther, (ne, target, 0))  # an ignored target may index nothing
    picked = graph.call_function(ops.index.Tensor, (weight, [safe]))
    wide = graph.call_function(ops._to_copy.default, (picked,), {"dtype": torch.float64})  # fp16 sums overflow
    return graph.call_function(ops.sum.default, (graph.call_function(ops.mul.Tensor, (wide, ne)),))


def _attr(root: Any, target: str) -> Any:
    """The tensor a ``get_attr`` target names in ``root`` (or in the module a DDP wrapper holds), or None."""
    for base in (root, getattr(root, "module", None)):
        obj = base
        for part in target.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.Tensor):
            return obj
    return None

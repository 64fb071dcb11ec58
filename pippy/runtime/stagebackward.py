"""A stage's backward per micro-batch: whole (B), input-gradient (I) and weight-gradient (W), and what each keeps.

A mixin of :class:`pippy.runtime.stage.Stage`, which runs the forward that leaves a
micro-batch's :class:`_MbState` here. I returns the input gradients at once; W, later, accumulates
the parameters' gradients, from the weight-gradient taps (:mod:`pippy.runtime.wgrad`) where the
forward ran through them, else by a second autograd pass over the graph I kept.

A backward graph that runs ``torch.compile``'d code (a compiled stage module, a compiled block, a
compiled loss) is never run twice: a compiled backward may write into the tensors its forward saved
(inductor reuses them as buffers, and its compile cache can hand out such code even where donated
buffers were turned off), so a second pass over a kept graph reads overwritten values. I then runs
the whole backward once, accumulating the weight gradients too, and W has nothing left to do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pippy.frontend.split import StageInfo
from pippy.runtime.stageerror import StageError
from pippy.runtime.wgrad import WeightGradTaps, one_pass_inputs
from pippy.sim.memory import SavedBytes, held_bytes

__all__ = ["StageBackward"]


@dataclass(slots=True)
class _MbState:
    """What one micro-batch leaves on the stage between its actions."""

    inputs: list[Any]
    outputs: tuple[Any, ...]
    training: bool = True
    readers: int = 0  # forward-only: readers of the outputs still to come
    tapped: bool = False  # ran the forward with weight-grad taps (split backward)
    taps: list[Any] = field(default_factory=list)
    aux: list[Any] = field(default_factory=list)
    loss: torch.Tensor | None = None
    saved_bytes: int = 0
    counter: SavedBytes | None = None  # measure_activations, until I: the forward's counter (and the loss's)
    roots: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    tap_grads: list[torch.Tensor | None] | None = None
    whole: bool = False  # I ran the whole backward (compiled code in the graph): W has nothing left to do


class StageBackward:
    """B, I and W of one micro-batch (mixed into :class:`pippy.runtime.stage.Stage`, which sets these).

    I returns the input's gradient at once; W, later, accumulates the weights' (together they are B):

        >>> from pippy import SplitPoint, pipeline
        >>> from pippy.runtime.stage import Stage
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
        >>> stage = Stage(pipeline(net, 1, (torch.ones(2, 3),), split_spec={"0": SplitPoint.END}), 1, "cpu")
        >>> h, g = torch.randn(2, 3), torch.ones(2, 2)  # stage 1's input, and its output's gradient
        >>> out = stage.forward(0, [h], training=True)
        >>> grads = stage.backward_input(0, [g])  # I
        >>> torch.allclose(grads[0], g @ net[1].weight, atol=1e-6), stage.submod.get_submodule("1").weight.grad is None
        (True, True)
        >>> stage.backward_weight(0)  # W
        >>> torch.allclose(stage.submod.get_submodule("1").weight.grad, g.T @ h, atol=1e-6)
        True
    """

    info: StageInfo
    submod: nn.Module
    through_hooks: bool
    measure_activations: bool
    _taps: WeightGradTaps | None
    _state: dict[int, _MbState]
    _compiled_backward: bool | None
    where: Callable[[int, str], str]
    _get: Callable[[int, str], _MbState]

    def _roots(self, mb: int, st: _MbState, grads: Sequence[torch.Tensor | None] | None) -> tuple[list, list]:
        if st.loss is not None:
            return [st.loss], [torch.ones_like(st.loss)]
        outs, gs = [], []
        for j, o in enumerate(st.outputs):
            g = grads[j] if grads is not None and j < len(grads) else None
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None:
                if g.shape != o.shape:
                    raise StageError(
                        f"{self.where(mb, 'B')}: gradient for output {j} ({self.info.output_names[j]}) has shape "
                        f"{list(g.shape)}, expected {list(o.shape)}"
                    )
                outs.append(o)
                gs.append(g)
        return outs, gs

    def _input_grads(self, st: _MbState) -> list[torch.Tensor | None]:
        """Each input's gradient; None where it needs none or no path from the loss reached it."""
        return [x.grad if isinstance(x, torch.Tensor) and x.requires_grad else None for x in st.inputs]

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
        taps = self._taps if st.tapped else None
        if (taps is None or not taps.exact) and self._runs_compiled(outs):  # W would run the graph from the roots again
            return self._whole_at_input(st, outs, gs)
        want = [x for x in st.inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        tap_leaves = [e for tap in st.taps for e in tap] if taps is not None and taps.exact else []
        targets = want + tap_leaves
        if outs and targets:
            # the graph is needed again in W only for weights without a closed-form gradient
            keep = taps is None or not taps.closed_form
            got = torch.autograd.grad(outs, targets, gs, retain_graph=keep, allow_unused=True)
            for x, g in zip(want, got[: len(want)]):
                x.grad = g
            st.tap_grads = list(got[len(want) :])
        res = self._input_grads(st)
        if taps is not None and taps.exact and st.tap_grads is not None:
            self._keep_for_w(st, taps)
        return res

    def _runs_compiled(self, roots: list[torch.Tensor]) -> bool:
        """Whether the backward from ``roots`` runs compiled code; looked up at the step's first I (same code for
        every micro-batch), again after :meth:`refresh_taps`."""
        if self._compiled_backward is None and roots:
            self._compiled_backward = runs_compiled_code(roots)
        return bool(self._compiled_backward)

    def _whole_at_input(self, st: _MbState, outs: list[torch.Tensor], gs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """I of a graph with compiled code: the whole backward, once (weights accumulate now, in I's order); the
        graph and the activations go now, W only drops the micro-batch."""
        if outs:
            torch.autograd.backward(outs, gs)
        res = self._input_grads(st)
        st.whole, st.inputs, st.outputs, st.loss, st.roots, st.counter = True, [], (), None, ([], []), None
        st.saved_bytes = 0
        return res

    def _keep_for_w(self, st: _MbState, taps: WeightGradTaps) -> None:
        """After I with exact taps, W reads only the taps, their gradients and the closed forms' inputs:
        free the rest now (inputs and their gradients, outputs, the received gradients)."""
        kept = _bytes(st)  # the graph was kept for taps without a closed form: its saved bytes stay too
        st.taps = taps.slim(st.taps, st.aux)
        st.inputs, st.outputs, st.loss, st.roots, st.counter = [], (), None, ([], []), None
        if self.measure_activations:
            grads = st.tap_grads or []
            st.saved_bytes = (held_bytes([*st.taps, *st.aux, *grads], skip=self.submod.parameters())
                              if taps.closed_form else kept + held_bytes(grads))

    def backward_weight(self, mb: int) -> None:
        """Weight-gradient backward (W) of ``mb``: accumulate parameter grads, free the micro-batch."""
        st = self._get(mb, "W")
        if st.roots is None:
            raise StageError(f"{self.where(mb, 'W')}: W ran before I for this micro-batch")
        if st.whole:
            del self._state[mb]
            return
        taps = self._taps if st.tapped else None
        if taps is not None and taps.exact and st.tap_grads is not None:
            taps.weight_grads(st.taps, st.tap_grads, st.aux)
        else:
            outs, gs = st.roots
            for mod in self.submod.modules() if self.through_hooks else ():  # FSDP2: gather what the forward saw
                if callable(getattr(mod, "unshard", None)) and callable(getattr(mod, "set_requires_gradient_sync", None)):
                    mod.unshard()
            params = [p for p in self.submod.parameters() if p.requires_grad]
            if outs and params:
                extra = one_pass_inputs(self.submod, st.inputs)  # a group norm's weights alone can crash torch
                for x in extra:
                    x.grad = None  # I's gradients went out already: W's copies go with the micro-batch
                torch.autograd.backward(outs, gs, inputs=params + extra)
        del self._state[mb]


def runs_compiled_code(roots: Sequence[torch.Tensor]) -> bool:
    """Whether the autograd graph behind ``roots`` holds a ``torch.compile``'d region (AOTAutograd's
    ``CompiledFunctionBackward``), walked back to the leaves (a stage's inputs are leaves).

        >>> import torch
        >>> x = torch.ones(2, requires_grad=True)
        >>> runs_compiled_code([torch.tanh(x).sum()])
        False
    """
    stack = [r.grad_fn for r in roots if isinstance(r, torch.Tensor) and r.grad_fn is not None]
    seen: set[Any] = set()  # the nodes themselves (torch keeps one Python object per live node)
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if fn.name().startswith("CompiledFunction"):
            return True
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return False


def _bytes(st: _MbState) -> int:
    """The bytes ``measure_activations`` counts for one micro-batch: its counter's until I, then what I kept."""
    return st.counter.total if st.counter is not None else st.saved_bytes

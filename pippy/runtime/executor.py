"""The one executor: runs a lowered schedule's actions for the stages this rank owns, and records a trace.

Any schedule (GPipe, 1F1B, interleaved, zero-bubble, a user's CSV) runs through ``Executor.run``.
Activations go stage to stage over any edge (skip connections too); a value whose consumer is
on the same rank is handed over directly, otherwise it is sent.

    >>> # ex = Executor(stages, lowered_schedule, transport); gen = ex.run(StepInputs(...))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pippy.frontend.split import USER, InputRef
from pippy.runtime.comm import Transport, WaitContext
from pippy.runtime.stage import PipelineStage, StageError
from pippy.runtime.tied import TiedGrads
from pippy.runtime.wfill import BubbleFiller
from pippy.schedules.ir import Action, Kind, Schedule
from pippy.sim.timeline import Event

__all__ = ["Executor", "StepInputs", "StepResult"]


@dataclass(slots=True)
class StepInputs:
    """What one step needs on this rank (only the ranks holding the first/last stage get data)."""

    microbatches: list[list[Any]] | None
    targets: list[Any] | None
    loss_fn: Callable[..., torch.Tensor] | None
    training: bool
    loss_scale: float = 1.0
    keep_outputs: bool = True


@dataclass(slots=True)
class StepResult:
    """Per-micro-batch outputs (last stage only), unscaled losses, and the trace if recorded."""

    outputs: list[Any] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    peak_live: dict[int, int] = field(default_factory=dict)
    peak_bytes: dict[int, int] = field(default_factory=dict)


class Executor:
    """Runs ``schedule`` (lowered) for ``stages`` (this rank's) over ``transport``.

        >>> # for _ in Executor(stages, sched, transport).run(inputs): pass
    """

    def __init__(self, stages: Sequence[PipelineStage], schedule: Schedule, transport: Transport, *, trace: bool = False,
                 fill_bubbles: bool = True):
        self.stages = {st.index: st for st in stages}
        self.schedule = schedule
        self.transport = transport
        self.rank = transport.rank
        self.trace = trace
        self.t_origin = 0.0
        self.actions = schedule.actions[self.rank]
        self.stage_to_rank = schedule.stage_to_rank
        pipe = stages[0].pipe
        self.infos = pipe.stage_infos
        self.pipe = pipe
        self.last = pipe.num_stages - 1
        self.tied = TiedGrads(pipe, self.stages, self.stage_to_rank, transport)
        self._eval_cache: dict[tuple[int, int], tuple[Any, ...]] = {}
        self._eval_left: dict[tuple[int, int], int] = {}
        self._readers: dict[int, int] = {}  # per local stage: its SEND_F (if any) + local consumer stages
        for st in stages:
            readers = self.infos[st.index].consumer_stages
            remote = any(self.stage_to_rank[d] != self.rank for d in readers)
            self._readers[st.index] = int(remote) + sum(1 for d in readers if self.stage_to_rank[d] == self.rank)
        self.started = False  # set once this step posted a message (an error after that may leave some in flight)
        self._edge_id: dict[tuple[int, int, int, int], int] = {}
        for info in self.infos:
            for j, cons in enumerate(info.consumers):
                for d, k in cons:
                    self._edge_id[(info.index, j, d, k)] = len(self._edge_id)
        # receive prefetch: each RECV is posted just before the compute action preceding it
        self._prefetch_at: dict[int, list[int]] = {}
        last_compute = -1
        ordered = bool(getattr(transport, "ordered", False))  # in-order matching: never post a recv early
        for idx, act in enumerate([] if ordered else self.actions):
            if act.kind.is_compute:
                last_compute = idx
            elif act.kind in (Kind.RECV_F, Kind.RECV_B) and last_compute >= 0:
                self._prefetch_at.setdefault(last_compute, []).append(idx)
        # mirrors lower(): a SEND_B follows B/I whenever any producer is remote (it may carry no gradient)
        self._send_b_stages = {
            s for s in self.stages if any(r.src_stage != USER and self.stage_to_rank[r.src_stage] != self.rank for r in self.infos[s].inputs)
        }
        self._send_b_order: dict[int, list[tuple[int, InputRef]]] = {}  # edge-id order, as the producer's RECV_B
        for s in self.stages:
            ins = [(self._edge_id[(r.src_stage, r.index, s, k)], k, r) for k, r in enumerate(self.infos[s].inputs) if r.src_stage != USER]
            self._send_b_order[s] = [(k, r) for _, k, r in sorted(ins, key=lambda e: e[0])]
        split = {a.stage for a in self.actions if a.kind is Kind.I}
        self.split_backward = split
        self.filler = BubbleFiller(self.actions)
        self.fill_bubbles = fill_bubbles
        for st in stages:
            st.rank_hint = self.rank

    # ------------------------------------------------------------------ helpers
    def _tag(self, src: int, j: int, dst: int, k: int, backward: bool, mb: int, m: int) -> int:
        return (self._edge_id[(src, j, dst, k)] * 2 + int(backward)) * m + mb

    def _ctx(self, a: Action, peer: int, what: str) -> WaitContext:
        return WaitContext(self.rank, a.stage, a.kind.value, a.mb, peer, what)

    # ------------------------------------------------------------------ run
    def run(self, inp: StepInputs, origin: float | None = None) -> Generator[None, None, StepResult]:
        """Generator running this rank's actions; returns a StepResult (``StopIteration.value``).

        Trace times are seconds since ``origin`` (a ``time.perf_counter()`` value; default: now).
        """
        self.t_origin = time.perf_counter() if origin is None else origin
        m = self.schedule.n_microbatches
        if inp.training:
            self.tied.snapshot()
        self.started = False
        res = StepResult()
        recv_f: dict[tuple[int, int], dict[int, Any]] = {}
        grad_acc: dict[tuple[int, int], list[torch.Tensor | None]] = {}
        in_grads: dict[tuple[int, int], list[torch.Tensor | None]] = {}
        pending: list[tuple[Any, WaitContext]] = []
        outputs_by_mb: dict[int, Any] = {}
        self._eval_cache, self._eval_left = {}, {}
        dev = next(iter(self.stages.values())).device
        prefetched: dict[int, list[tuple[Any, WaitContext, int, Any]]] = {}
        self.filler.start_step()
        fill = self.fill_bubbles and inp.training and self.filler.active
        i_done: set[tuple[int, int]] = set()
        for idx, a in enumerate(self.actions):
            for j in self._prefetch_at.get(idx, ()):  # post receives one compute action early: overlap
                self.started = True
                prefetched[j] = self._post(self.actions[j], dev)
            if idx in self.filler.ran:
                continue  # a W that already ran while this rank waited for a message
            t0 = time.perf_counter() if self.trace else 0.0
            if a.kind.is_comm:
                self.started = True
            s, i = a.stage, a.mb
            info = self.infos[s]
            stage = self.stages.get(s)
            if stage is None:
                raise StageError(
                    f"rank {self.rank}: schedule action {a} is for stage {s}, which this rank does not hold "
                    f"(it holds {sorted(self.stages)}); pass the stages the schedule places on this rank"
                )
            kind = a.kind
            if kind is Kind.F:
                ins = self._gather_inputs(a, info, inp, recv_f.pop((s, i), {}))
                outs = stage.forward(i, ins, training=inp.training, split_backward=s in self.split_backward)
                if not inp.training and self._readers[s]:
                    self._eval_cache[(s, i)] = outs  # until its SEND_F and local consumers have read it
                    self._eval_left[(s, i)] = self._readers[s]
                if s == self.last:
                    out = self.pipe.unflatten_output(outs)
                    if inp.training:
                        loss = self._loss(a, out, inp)
                        stage.set_loss(i, loss * inp.loss_scale)
                        res.losses.append(loss.detach())
                    if inp.keep_outputs:
                        outputs_by_mb[i] = _detach(out)
                if inp.training:
                    live = sum(st.live_microbatches() for st in self.stages.values())
                    res.peak_live[self.rank] = max(res.peak_live.get(self.rank, 0), live)
                    if stage.measure_activations:
                        nbytes = sum(st.live_activation_bytes() for st in self.stages.values())
                        res.peak_bytes[self.rank] = max(res.peak_bytes.get(self.rank, 0), nbytes)
            elif kind is Kind.SEND_F:
                for j, cons in enumerate(info.consumers):
                    meta = info.outputs[j]
                    for d, k in cons:
                        peer = self.stage_to_rank[d]
                        if peer != self.rank and meta.is_tensor:
                            t = stage.output(i, j) if inp.training else self._eval_out(stage, i, j)
                            t = t.detach().contiguous()
                            self._check_meta(a, t, meta, f"output {j} ({info.output_names[j]}) for stage {d}")
                            h = self.transport.isend(t, peer, self._tag(s, j, d, k, False, i, m))
                            pending.append((h, self._ctx(a, peer, f"send output {j} to stage {d}")))
                if not inp.training:
                    self._eval_read(s, i)
            elif kind in (Kind.RECV_F, Kind.RECV_B):
                posted = prefetched.pop(idx, None) or self._post(a, dev)
                filled, slack = self._fill(idx, [h for h, _, _, _ in posted if h is not None], i_done, res) if fill else (0.0, None)
                t_wait = time.perf_counter() if fill else 0.0
                if kind is Kind.RECV_F:
                    got: dict[int, Any] = {}
                    for h, ctx, k, buf in posted:
                        if h is not None:
                            yield from self.transport.wait(h, ctx)
                        got[k] = buf
                    recv_f[(s, i)] = got
                else:
                    acc = grad_acc.setdefault((s, i), [None] * len(info.outputs))
                    for h, ctx, j, buf in posted:
                        yield from self.transport.wait(h, ctx)
                        acc[j] = buf if acc[j] is None else acc[j] + buf
                if fill:
                    self.filler.note_wait(idx, time.perf_counter() - t_wait, filled, slack)
            elif kind in (Kind.B, Kind.I):
                grads: list[torch.Tensor | None] | None = grad_acc.pop((s, i)) if (s, i) in grad_acc else None
                gin = stage.backward(i, grads) if kind is Kind.B else stage.backward_input(i, grads)
                for k, ref in enumerate(info.inputs):
                    g = gin[k]
                    if ref.src_stage == USER or g is None:
                        continue
                    if self.stage_to_rank[ref.src_stage] == self.rank:
                        pacc = grad_acc.setdefault((ref.src_stage, i), [None] * len(self.infos[ref.src_stage].outputs))
                        pacc[ref.index] = g if pacc[ref.index] is None else pacc[ref.index] + g
                in_grads[(s, i)] = gin
                if kind is Kind.I:
                    i_done.add((s, i))
            elif kind is Kind.W:
                self._weight_step(a)
            elif kind is Kind.SEND_B:
                if (s, i) not in in_grads:
                    raise StageError(f"rank {self.rank}: {a} has no input gradients; SEND_B must follow B or I")
                gin = in_grads.pop((s, i))
                for k, ref in self._send_b_order[s]:
                    meta = info.input_meta[k]
                    if ref.src_stage == USER or not meta.requires_grad:
                        continue
                    peer = self.stage_to_rank[ref.src_stage]
                    if peer == self.rank:
                        continue
                    g = gin[k]
                    g = torch.zeros(meta.shape or (), dtype=meta.dtype, device=dev) if g is None else g.contiguous()
                    h = self.transport.isend(g, peer, self._tag(ref.src_stage, ref.index, s, k, True, i, m))
                    pending.append((h, self._ctx(a, peer, f"send grad of input {k} to stage {ref.src_stage}")))
            if kind in (Kind.B, Kind.I) and s not in self._send_b_stages:
                in_grads.pop((s, i), None)
            if len(pending) > 64:
                pending = [(h, c) for h, c in pending if not self.transport.done(h)]
            if self.trace:
                res.events.append(Event(self.rank, a, t0 - self.t_origin, time.perf_counter() - self.t_origin))
        for h, ctx in pending:
            yield from self.transport.wait(h, ctx)
        if self.last in self.stages and outputs_by_mb:
            res.outputs = [outputs_by_mb[i] for i in sorted(outputs_by_mb)]
        if inp.training and self.pipe.shared:
            yield from self.tied.sync()
        self._eval_cache = {}
        return res

    def _fill(self, idx: int, handles: list[Any], i_done: set[tuple[int, int]], res: StepResult) -> tuple[float, float | None]:
        """Run later W's while the messages of RECV ``idx`` are not in (see ``wfill``).

        Returns the seconds spent and, when the messages came in during the last W run, an
        estimate of when (its midpoint): the wait after it then reads ~0 and would overstate
        the slack by what the W overran.
        """
        filled, last = 0.0, 0.0
        while True:
            j = self.filler.pick(idx, i_done, filled)  # first: most waits have no candidate, and polling
            if j is None:  # a gloo receive costs a thread
                return filled, None
            if all(self.transport.arrived(h) for h in handles):
                return filled, (filled - last / 2 if last else None)
            w = self.actions[j]
            t0, t1 = self._weight_step(w)
            self.filler.ran.add(j)
            last = t1 - t0
            filled += last
            if self.trace:
                res.events.append(Event(self.rank, w, t0 - self.t_origin, t1 - self.t_origin))

    def _weight_step(self, a: Action) -> tuple[float, float]:
        """Run W ``a`` (in its slot or early); its time feeds the filler. Returns (start, end)."""
        t0 = time.perf_counter()
        self.stages[a.stage].backward_weight(a.mb)
        t1 = time.perf_counter()
        self.filler.note_w(a.stage, t1 - t0)
        return t0, t1

    def _post(self, a: Action, dev: torch.device) -> list[tuple[Any, WaitContext, int, Any]]:
        """Post the receives of a RECV_F / RECV_B action: (handle or None, context, slot, buffer)."""
        m = self.schedule.n_microbatches
        s, i = a.stage, a.mb
        info = self.infos[s]
        out: list[tuple[Any, WaitContext, int, Any]] = []
        if a.kind is Kind.RECV_F:
            # edge-id order = the order the producer's SEND_F posts them (NCCL matches in order per pair)
            remote = [
                (self._edge_id[(ref.src_stage, ref.index, s, k)], k, ref)
                for k, ref in enumerate(info.inputs)
                if ref.src_stage != USER and self.stage_to_rank[ref.src_stage] != self.rank
            ]
            for _, k, ref in sorted(remote):
                peer = self.stage_to_rank[ref.src_stage]
                meta = info.input_meta[k]
                ctx = self._ctx(a, peer, f"input {k} ({info.input_names[k]}) from stage {ref.src_stage}")
                if not meta.is_tensor:
                    out.append((None, ctx, k, meta.const))
                    continue
                buf = torch.empty(meta.shape or (), dtype=meta.dtype, device=dev)
                out.append((self.transport.irecv(buf, peer, self._tag(ref.src_stage, ref.index, s, k, False, i, m)), ctx, k, buf))
        else:
            for j, cons in enumerate(info.consumers):
                meta = info.outputs[j]
                for d, k in cons:
                    peer = self.stage_to_rank[d]
                    if peer == self.rank or not meta.requires_grad:
                        continue
                    buf = torch.empty(meta.shape or (), dtype=meta.dtype, device=dev)
                    h = self.transport.irecv(buf, peer, self._tag(s, j, d, k, True, i, m))
                    out.append((h, self._ctx(a, peer, f"grad of output {j} from stage {d}"), j, buf))
        return out

    # ------------------------------------------------------------------ forward details
    def _eval_out(self, stage: PipelineStage, i: int, j: int) -> Any:
        return self._eval_cache[(stage.index, i)][j]

    def _eval_read(self, s: int, i: int) -> None:
        """One reader of stage ``s``'s eval outputs for micro-batch ``i`` is done; free them after the last."""
        left = self._eval_left.get((s, i), 0) - 1
        if left <= 0:
            self._eval_cache.pop((s, i), None)
            self._eval_left.pop((s, i), None)
        else:
            self._eval_left[(s, i)] = left

    def _gather_inputs(self, a: Action, info: Any, inp: StepInputs, received: dict[int, Any]) -> list[Any]:
        local_read: set[int] = set()
        ins: list[Any] = []
        for k, ref in enumerate(info.inputs):
            if ref.src_stage == USER:
                if inp.microbatches is None:
                    raise StageError(
                        f"rank {self.rank}, stage {a.stage}, micro-batch {a.mb}, action {a}: this stage reads the "
                        "model's inputs but none were given; call step(x, ...) / eval(x) / stage(x) with the batch "
                        "on the rank that holds stage 0"
                    )
                ins.append(inp.microbatches[a.mb][ref.index])
            elif self.stage_to_rank[ref.src_stage] == self.rank:
                if inp.training:
                    ins.append(self.stages[ref.src_stage].output(a.mb, ref.index))
                else:
                    ins.append(self._eval_cache[(ref.src_stage, a.mb)][ref.index])
                    local_read.add(ref.src_stage)
            elif k in received:
                ins.append(received[k])
            else:
                raise StageError(
                    f"rank {self.rank}: {a} needs input {k} from stage {ref.src_stage} on rank "
                    f"{self.stage_to_rank[ref.src_stage]}, but no RECV_F ran before it; lower the schedule first"
                )
        for p in local_read:
            self._eval_read(p, a.mb)
        return ins

    def _loss(self, a: Action, out: Any, inp: StepInputs) -> torch.Tensor:
        where = f"rank {self.rank}, stage {a.stage}, micro-batch {a.mb}, action {a}"
        if inp.loss_fn is not None:
            if inp.targets is None:
                raise StageError(f"{where}: loss_fn is set but no target was given; call step(..., target=y) here")
            loss = inp.loss_fn(out, inp.targets[a.mb])
        else:
            loss = _loss_from_output(out)
            if loss is None:
                raise StageError(
                    f"{where}: step() needs a scalar loss: pass loss_fn=... to the schedule, or make the model "
                    f"return a 0-dim tensor (or an output with a 'loss' field); got {type(out).__name__}"
                )
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise StageError(
                f"{where}: loss_fn must return a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}; "
                "reduce it (reduction='mean' or 'sum')"
            )
        if not loss.requires_grad:
            raise StageError(
                f"{where}: the loss does not require grad, so there is nothing to backpropagate; check that "
                "loss_fn uses the model output (not a detached copy) and that the last stage has trainable inputs"
            )
        return loss.reshape(())

    @staticmethod
    def _check_meta(a: Action, t: torch.Tensor, meta: Any, what: str) -> None:
        if tuple(t.shape) != tuple(meta.shape or ()) or t.dtype != meta.dtype:
            raise StageError(
                f"{a}: {what} is {t.dtype}{list(t.shape)} but the traced pipe expects {meta.describe()}; "
                "shapes are fixed at trace time (use the traced micro-batch size)"
            )

def _detach(x: Any) -> Any:
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, x)


def _loss_from_output(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor) and out.dim() == 0:
        return out
    loss = out.get("loss") if hasattr(out, "get") else getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None

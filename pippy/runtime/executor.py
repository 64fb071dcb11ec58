"""The one executor: runs a lowered schedule's actions for the stages this rank owns, and records a trace.

Any schedule (GPipe, 1F1B, interleaved, zero-bubble, a user's CSV) runs through ``Executor.run``:
one small handler per action kind, over a per-step state. What crosses ranks, with which tag and
when receives are posted comes from the :class:`~pippy.runtime.plan.CommPlan`, built once per
schedule; activations live in the stages. A value whose consumer is on the same rank is handed
over directly, otherwise it is sent (skip connections too).

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> from pippy.runtime.localcomm import LocalTransport
    >>> from pippy.runtime.stage import Stage
    >>> from pippy.schedules.generators import forward_only
    >>> from pippy.schedules.lower import lower
    >>> net = torch.nn.Linear(3, 1)
    >>> pipe = pipeline(net, 2, (torch.ones(4, 3),))
    >>> ex = Executor([Stage(pipe, 0)], lower(forward_only((0,), 2)), LocalTransport.world(1)[0])
    >>> inputs = StepInputs(pipe.split_inputs((torch.ones(4, 3),), {}, 2), None, None, training=False)
    >>> [out.shape for out in ex.run_blocking(inputs).outputs]
    [torch.Size([2, 1]), torch.Size([2, 1])]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import torch

from pippy.frontend.split import USER
from pippy.runtime import usergrad
from pippy.runtime.dpstep import DataParallelStep
from pippy.runtime.loss import step_loss
from pippy.runtime.plan import CommPlan
from pippy.runtime.receives import Receives, action_ctx
from pippy.runtime.sendorder import SendOrder
from pippy.runtime.shapes import HEADER_TAG, check_output, needs_incoming, send_value
from pippy.runtime.stage import Stage, StageError
from pippy.runtime.stepstate import StepInputs, StepResult, _Step, add_grad
from pippy.runtime.tied import TiedGrads
from pippy.runtime.transport import Transport, WaitContext
from pippy.runtime.wfill import BubbleFiller
from pippy.schedules.ir import Action, Kind, Schedule
from pippy.sim.timeline import Event

__all__ = ["Executor", "StepInputs", "StepResult"]


class Executor:
    """Runs ``schedule`` (lowered) for ``stages`` (this rank's) over ``transport``.

    ``run(inputs)`` is a generator (waits yield on an in-process transport) that returns a
    :class:`StepResult`; ``run_blocking(inputs)`` drives it to the end.
    """

    def __init__(self, stages: Sequence[Stage], schedule: Schedule, transport: Transport, *, trace: bool = False,
                 fill_bubbles: bool = True) -> None:
        self.stages = {st.index: st for st in stages}
        self.schedule = schedule
        self.transport = transport
        self.rank = transport.rank
        self.trace = trace
        self.t_origin = 0.0
        self.actions = schedule.actions[self.rank]
        self.stage_to_rank = schedule.stage_to_rank
        self.pipe = stages[0].pipe
        self.infos = self.pipe.stage_infos
        self.last = self.pipe.num_stages - 1
        self.plan = CommPlan(self.infos, schedule, self.rank, ordered=transport.ordered)
        self.receives = Receives(transport, self.plan, self.infos, self.stages)
        # sends go out through this: on ordered transports (NCCL) in each peer's receive order
        self.sender: Any = SendOrder(transport, self.infos, schedule) if transport.ordered else transport
        self.tied = TiedGrads(self.pipe, self.stages, self.stage_to_rank, transport)
        self.split_backward = {a.stage for a in self.actions if a.kind is Kind.I}
        self.filler = BubbleFiller(self.actions)
        self.fill_bubbles = fill_bubbles
        self.dp: DataParallelStep | None = None  # this step's data-parallel wiring (DDP, FSDP2)
        self.started = False  # set once this step posted a message (an error after that may leave some in flight)
        self.current: Action | None = None  # the action running now (named when the step fails)
        self._compute: dict[Kind, Callable[[_Step, Action], None]] = {
            Kind.F: self._forward, Kind.SEND_F: self._send_f, Kind.B: self._backward, Kind.I: self._backward,
            Kind.W: self._weight, Kind.SEND_B: self._send_b,
        }
        for st in stages:
            st.rank_hint = self.rank

    # ------------------------------------------------------------------ the step
    def run(self, inp: StepInputs, origin: float | None = None) -> Generator[None, None, StepResult]:
        """Generator running this rank's actions; returns a StepResult (``StopIteration.value``).

        Trace times are seconds since ``origin`` (a ``time.perf_counter()`` value; default: now).
        """
        self.t_origin = time.perf_counter() if origin is None else origin
        self.plan.phase = 0 if self.transport.ordered else inp.phase
        if inp.training:
            self.tied.snapshot()
            for s in self.split_backward & self.stages.keys():
                self.stages[s].refresh_taps()
        self.started = False
        self.current = None
        self.filler.start_step()
        self.receives.start_step()
        if isinstance(self.sender, SendOrder):
            self.sender.start_step()
        dp = self.dp = DataParallelStep(self.stages, split_backward=self.split_backward,
                                        n_microbatches=self.plan.n_microbatches, training=inp.training)
        self.filler.fixed = dp.fixed  # W's that gather FSDP2 shards run in the schedule's order, never early
        st = _Step(inp, fill=self.fill_bubbles and inp.training and self.filler.active)
        own = inp.own if inp.training else None  # the own counted loss: the step's grads are scaled at its end
        params = [p for x in self.stages.values() for p in x.parameters()] if own is not None else []
        if own is not None:
            own.snapshot(params)
        for idx, a in enumerate(self.actions):
            for j in self.plan.prefetch_at.get(idx, ()):  # post receives one compute action early: overlap
                self.started = True
                st.prefetched[j] = self.receives.post(self.actions[j])
            for j, end in self.plan.post_order.get(idx, ()):  # ordered (NCCL): where the order of messages says
                self.started = True
                posted = self.receives.post(self.actions[j], end)
                st.prefetched.setdefault(j, []).extend(posted)
                yield from self.receives.open(posted)
            if idx in self.filler.ran:
                continue  # a W that already ran while this rank waited for a message
            if a.stage not in self.stages:
                raise StageError(
                    f"rank {self.rank}: schedule action {a} is for stage {a.stage}, which this rank does not hold "
                    f"(it holds {sorted(self.stages)}); pass the stages the schedule places on this rank"
                )
            t0 = time.perf_counter() if self.trace else 0.0
            self.current = a
            if a.kind is Kind.RECV_F or a.kind is Kind.RECV_B:
                self.started = True
                yield from self._recv(st, idx, a)
            else:
                self.started = self.started or a.kind.is_comm
                self._compute[a.kind](st, a)
            while st.sends and self.sender.done(st.sends[0][0]):  # a sent message's tensor is freed here
                yield from self.sender.wait(*st.sends.pop(0))  # (raises if the send failed)
            if self.trace:
                st.res.events.append(Event(self.rank, a, t0 - self.t_origin, time.perf_counter() - self.t_origin))
        self.current = None
        for h, ctx in st.sends:
            yield from self.sender.wait(h, ctx)
        if self.last in self.stages and st.outputs:
            st.res.outputs = [st.outputs[i] for i in sorted(st.outputs)]
        if inp.training and self.pipe.shared:
            yield from self.tied.sync()
        self.transport.settle()  # NCCL: the step's messages, waited for on the device, finished in time
        if own is not None:  # the own counted loss's factor: from the loss stage's rank to all (runtime/ownscale)
            first = min(self.stages)
            yield from own.exchange(self.transport, self.rank, self.stage_to_rank[self.last], first,
                                    self.stages[first].device, inp.own_trained)
            own.scale_user_grads(st.user_grads, own.f)
        usergrad.flush(st.user_grads)
        dp.finish()
        if own is not None:
            own.rescale(params, own.f)
        if inp.own is not None and self.last in self.stages:
            st.res.own_counts = inp.own.counts
        return st.res

    def run_blocking(self, inp: StepInputs) -> StepResult:
        """Run the whole step here (a transport whose waits block, or a one-rank schedule)."""
        gen = self.run(inp)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ compute handlers
    def _forward(self, st: _Step, a: Action) -> None:
        s, i, inp = a.stage, a.mb, st.inp
        stage = self.stages[s]
        ins = self._gather_inputs(st, a)
        readers = 0 if inp.training else self.plan.readers[s]
        user_grad = usergrad.wanted(self.infos[s], ins, inp.training)  # they get a grad, as in the plain model
        outs = stage.forward(i, ins, training=inp.training, split_backward=s in self.split_backward, readers=readers,
                             grad_inputs=user_grad, kwargs=None if inp.stage_kwargs is None else inp.stage_kwargs[i])
        info = self.infos[s]
        if inp.training and s != self.last:  # each output carries a gradient only where the trace planned one
            usergrad.check_traced(f"rank {self.rank}, stage {s}, micro-batch {i}, action {a}", info, user_grad,
                                  outs, False, stage.unfrozen_params)
        for j, (o, meta) in enumerate(zip(outs, info.outputs)):
            if isinstance(o, torch.Tensor):
                check_output(self.rank, a, o, meta, f"output {j} ({info.output_names[j]})",
                             getattr(self.pipe, "manual", False))
                if meta.dynamic:
                    self.receives.note_output(f"rank {self.rank}, stage {s}, micro-batch {i}, action {a}", s, j, meta,
                                              tuple(o.shape))
        if s == self.last:
            out = self.pipe.unflatten_output(outs)
            if inp.training:
                where = f"rank {self.rank}, stage {s}, micro-batch {i}, action {a}"
                target = None if inp.targets is None else inp.targets[i]
                own = inp.own if inp.own_trained else None  # checked finite by its count (runtime/ownscale)
                with stage.counting_loss(i):
                    loss = step_loss(where, i, out, inp.loss_fn, target, inp.targets is not None,
                                     inp.check_finite and own is None)
                if inp.probe is not None:
                    inp.loss_scale, inp.probe = inp.probe(out, target, loss), None
                if inp.counts is not None:
                    stage.set_loss(i, loss / inp.counts[1])
                    st.res.losses.append(loss.detach() / inp.counts[0][i])
                elif own is not None:  # weighted by its count; the step's factor comes at its end
                    stage.set_loss(i, own.seed(loss, own.count(ins, stage.submod), inp.check_finite, where))
                    st.res.losses.append(loss.detach())
                else:
                    stage.set_loss(i, loss * inp.loss_scale)
                    st.res.losses.append(loss.detach())
            elif inp.targets is not None and inp.loss_fn is not None:  # eval(x, target=y): the losses, no backward
                where = f"rank {self.rank}, stage {s}, micro-batch {i}, action {a}"
                st.res.losses.append(step_loss(where, i, out, inp.loss_fn, inp.targets[i], True, inp.check_finite,
                                               backward=False))
            if inp.own is not None and not inp.own_trained:  # weights for the merged loss; a loss_fn is not exact
                inp.own.note(i, ins, inp.training, f"rank {self.rank}, stage {s}, micro-batch {i}, action {a}",
                             stage.submod)
            if inp.keep_outputs:
                st.outputs[i] = _detach(out)
        if inp.training:
            peaks = st.res.peak_live
            peaks[self.rank] = max(peaks.get(self.rank, 0), sum(x.live_microbatches() for x in self.stages.values()))
            self._note_bytes(st, stage)

    def _note_bytes(self, st: _Step, stage: Stage) -> None:
        """With ``measure_activations``: this rank's live activation bytes after an F or an I (which can
        hold more than it frees: the weight gradients' inputs beside the gradients it computed)."""
        if stage.measure_activations:
            nbytes = sum(x.live_activation_bytes() for x in self.stages.values())
            st.res.peak_bytes[self.rank] = max(st.res.peak_bytes.get(self.rank, 0), nbytes)

    def _gather_inputs(self, st: _Step, a: Action) -> list[Any]:
        received = st.received.pop((a.stage, a.mb), {})
        local: set[int] = set()
        ins: list[Any] = []
        for k, ref in enumerate(self.infos[a.stage].inputs):
            if ref.src_stage == USER:
                if st.inp.microbatches is None:
                    raise StageError(
                        f"rank {self.rank}, stage {a.stage}, micro-batch {a.mb}, action {a}: this stage reads the "
                        "model's inputs but none were given; call step(x, ...) / eval(x) / stage(x) with the batch "
                        "on the rank that holds stage 0"
                    )
                ins.append(st.inp.microbatches[a.mb][ref.index])
            elif ref.src_stage in self.stages:
                ins.append(self.stages[ref.src_stage].output(a.mb, ref.index))
                local.add(ref.src_stage)
            elif k in received:
                ins.append(received[k])
            else:
                raise StageError(
                    f"rank {self.rank}: {a} needs input {k} from stage {ref.src_stage} on rank "
                    f"{self.stage_to_rank[ref.src_stage]}, but no RECV_F ran before it; lower the schedule first"
                )
        for p in local:  # forward-only: this stage was one reader of each local producer's outputs
            self.stages[p].release(a.mb)
        return ins

    def _send_f(self, st: _Step, a: Action) -> None:
        s, i = a.stage, a.mb
        stage, m = self.stages[s], self.plan.n_microbatches
        for e in self.plan.send_f[s]:
            ctx = self._ctx(a, e.peer, f"send output {e.j} to stage {e.dst}")
            tag, meta = e.tag(backward=False, mb=i, n_microbatches=m, phase=self.plan.phase), self.infos[s].outputs[e.j]
            if needs_incoming(meta):  # its size varies: a shape header goes first
                handles = send_value(self.sender, stage.output(i, e.j), meta, e.peer, tag, ctx, stage.device)
                st.sends.extend((h, ctx) for h in handles)
                continue
            t = stage.output(i, e.j).detach().contiguous()  # shape and dtype were checked at its F
            st.sends.append((self.sender.isend(t, e.peer, tag, ctx), ctx))
        stage.release(i)  # forward-only: the send has read the outputs

    def _backward(self, st: _Step, a: Action) -> None:
        """B or I: input gradients; those of local producers are summed in, remote ones wait for SEND_B."""
        s, i = a.stage, a.mb
        stage = self.stages[s]
        grads = st.out_grads.pop((s, i), None)
        dp = self.dp
        assert dp is not None  # set by run()
        if dp.hsplit is not None and dp.hsplit.promotes(s):
            gin = dp.hsplit.backward(stage, i, grads, dp.ddp.get(s), split=a.kind is Kind.I)
        elif a.kind is Kind.B:
            if dp.any:
                dp.before_b(s, i)
            gin = stage.backward(i, grads)
        else:
            gin = stage.backward_input(i, grads)
        for ref, g in zip(self.infos[s].inputs, gin):
            if g is None and ref.src_stage in self.stages and dp.reduces(ref.src_stage):  # its reduction must run: zeros,
                out = self.stages[ref.src_stage].output(i, ref.index)  # as a message from another rank carries them
                g = torch.zeros_like(out) if isinstance(out, torch.Tensor) and out.requires_grad else None
            if g is not None and ref.src_stage != USER and ref.src_stage in self.stages:
                add_grad(st.out_grads, (ref.src_stage, i), len(self.infos[ref.src_stage].outputs), ref.index, g)
        usergrad.collect(st.user_grads, self.infos[s].inputs, gin, None if st.inp.microbatches is None else
                         st.inp.microbatches[i])
        if s in self.plan.send_b_stages:
            st.in_grads[(s, i)] = gin
        if a.kind is Kind.I:
            st.i_done.add((s, i))
            self._note_bytes(st, stage)

    def _send_b(self, st: _Step, a: Action) -> None:
        s, i, m = a.stage, a.mb, self.plan.n_microbatches
        gin = st.in_grads.pop((s, i), None)
        if gin is None:
            raise StageError(f"rank {self.rank}: {a} has no input gradients; SEND_B must follow B or I")
        dev = self.stages[s].device
        for e in self.plan.send_b[s]:
            meta = self.infos[s].input_meta[e.k]
            g = gin[e.k]
            tag = e.tag(backward=True, mb=i, n_microbatches=m, phase=self.plan.phase)
            ctx = self._ctx(a, e.peer, f"send grad of input {e.k} to stage {e.src}")
            if self.plan.grad_flags:  # whether there is a gradient (see CommPlan)
                flag = torch.tensor([g is not None], dtype=torch.uint8)  # on the host, as its receive
                st.sends.append((self.sender.isend(flag, e.peer, HEADER_TAG + tag, ctx), ctx))
            if g is None:
                g = torch.zeros(st.in_shapes.get((s, i, e.k), meta.shape or ()), dtype=meta.dtype, device=dev)
            st.sends.append((self.sender.isend(g.contiguous(), e.peer, tag, ctx), ctx))

    def _weight(self, st: _Step, a: Action) -> None:
        self._weight_step(a)

    def _weight_step(self, a: Action) -> tuple[float, float]:
        """Run W ``a`` (in its slot or early); its time feeds the filler. Returns (start, end)."""
        t0 = time.perf_counter()
        hsplit = self.dp.hsplit if self.dp is not None else None
        if hsplit is not None and hsplit.promotes(a.stage):  # FSDP2 / DDP stages: reduce at their last I
            hsplit.weight(self.stages[a.stage], a.mb)
        else:
            self.stages[a.stage].backward_weight(a.mb)
        t1 = time.perf_counter()
        self.filler.note_w(a.stage, t1 - t0)
        return t0, t1

    # ------------------------------------------------------------------ receives
    def _recv(self, st: _Step, idx: int, a: Action) -> Iterator[None]:
        """RECV_F / RECV_B: wait for the messages (running later W's meanwhile, when filling)."""
        posted = st.prefetched.pop(idx, None) or self.receives.post(a)
        filled, slack = self._fill(st, idx, [h for p in posted for h in p.handles()]) if st.fill else (0.0, None)
        t_wait = time.perf_counter() if st.fill else 0.0
        shapes: dict[int, tuple[int, ...]] = {}
        yield from self.receives.complete(posted, shapes)
        for k, shape in shapes.items():
            st.in_shapes[(a.stage, a.mb, k)] = shape
        if a.kind is Kind.RECV_F:
            st.received[(a.stage, a.mb)] = {p.slot: p.value for p in posted}
        else:
            n_out = len(self.infos[a.stage].outputs)
            reduces = self.dp is not None and self.dp.reduces(a.stage)
            for p in posted:  # no gradient reached the peer's input: no backward from here either (but
                if p.none and not reduces:  # DDP / FSDP2 stages keep the zeros: their reduction must run)
                    continue
                add_grad(st.out_grads, (a.stage, a.mb), n_out, p.slot, p.value)
        if st.fill:
            self.filler.note_wait(idx, time.perf_counter() - t_wait, filled, slack)

    def _fill(self, st: _Step, idx: int, handles: list[Any]) -> tuple[float, float | None]:
        """Run later W's while the messages of RECV ``idx`` are not in (see ``wfill``).

        Returns the seconds spent and, when the messages came in during the last W run, an
        estimate of when (its midpoint): the wait after it then reads ~0 and would overstate
        the slack by what the W overran.
        """
        filled, last = 0.0, 0.0
        while True:
            j = self.filler.pick(idx, st.i_done, filled)  # first: most waits have no candidate, and polling
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
                st.res.events.append(Event(self.rank, w, t0 - self.t_origin, t1 - self.t_origin))

    # ------------------------------------------------------------------ details
    def _ctx(self, a: Action, peer: int, what: str) -> WaitContext:
        return action_ctx(self.rank, a, peer, what)


def _detach(x: Any) -> Any:
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, x)

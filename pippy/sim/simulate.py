"""Event simulation of a Schedule under a CostModel: timeline, step time, bubble and peak memory.

Each rank runs its actions in order. An action starts when its rank is free and every input has
arrived: an input made on another rank arrives ``latency + bytes / bandwidth`` after its producer
ends (or, in a lowered schedule, after the producer's SEND); inputs from the same rank are ready
when their action has ended. A compute action's event lasts its duration; its rank stays
occupied for the cost model's ``overhead`` after it (the runtime's own work), and its outputs
leave after that. What an action waits for is :func:`pippy.schedules.ir.needs`, the
rule the validator, the lowering and the runtime follow too. ``RECV`` actions block until their
message arrives; ``SEND`` actions take no time. Compute-only and lowered schedules are both
accepted. Durations come from the CostModel: ``B`` takes ``b``, ``I`` and ``W`` their own, and
``F`` takes ``split_f`` on the stages whose backward the schedule splits (those with an ``I``
action), ``f`` elsewhere.

    >>> from pippy.schedules.ir import Schedule, as_actions
    >>> from pippy.sim.cost import CostModel
    >>> s = Schedule("tiny", [as_actions(["0F0", "0B0"]), as_actions(["1F0", "1B0"])], (0, 1), 1)
    >>> r = simulate(s, CostModel.uniform(2))
    >>> r.step_time, r.bubble
    (6.0, [0.5, 0.5])
"""

from __future__ import annotations

import gc
from array import array
from dataclasses import dataclass, field
from typing import Any

from pippy.schedules.ir import Action, Done, Kind, Need, Schedule, need_table
from pippy.sim._fastsim import Misfit, NeedsLowered, Stuck, Template
from pippy.sim.cost import CostModel, StageCost
from pippy.sim.timeline import Event, Timeline

__all__ = ["DeadlockError", "SimResult", "simulate"]

# Completion slots are pippy.schedules.ir.Done: a key is (stage * _NSLOT + slot) * n_microbatches + mb.
_NSLOT = len(Done)
_NUMPY_MIN_RANKS = 16  # below this the per-action loop wins (numpy rounds cost ~50 us each)
try:
    import numpy  # noqa: F401

    _HAVE_NUMPY = True
except ImportError:  # pragma: no cover - numpy ships with most torch installs
    _HAVE_NUMPY = False
_SLOT_NAME = {Done.F: "F", Done.G: "B/I", Done.W: "W", Done.SEND_F: "SEND_F", Done.SEND_B: "SEND_B"}


class DeadlockError(RuntimeError):
    """No rank can make progress: every unfinished rank waits for something that never comes."""


@dataclass(slots=True)
class SimResult:
    """What ``simulate`` predicts for one training step.

    ``bubble[r]`` is ``1 - busy[r] / step_time`` with ``busy`` the compute time (F, B, I, W) of
    rank ``r``. ``peak_memory[r]`` is the largest activation (plus static) bytes rank ``r`` holds.

        >>> SimResult.__name__
        'SimResult'
    """

    schedule: Schedule
    step_time: float
    bubble: list[float]
    busy: list[float]
    peak_memory: list[float]
    _starts: list[Any] = field(repr=False)
    _ends: list[Any] = field(repr=False)
    _timeline: Timeline | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        """Step time, worst bubble and peak memory, and the schedule's short repr (the lists stay in the fields).

            >>> from pippy.schedules.generators import one_f_one_b
            >>> simulate(one_f_one_b(8, 32), CostModel.uniform(8))
            SimResult(step_time=117, bubble max 17.9%, peak_memory max 8, 8 ranks, Schedule('1f1b': 8 ranks, ...))
        """
        return (f"SimResult(step_time={self.step_time:g}, bubble max {max(self.bubble, default=0):.1%}, peak_memory "
                f"max {max(self.peak_memory, default=0):g}, {len(self.busy)} ranks, {self.schedule!r})")

    @property
    def timeline(self) -> Timeline:
        """Every action as an ``Event`` (built on first use; large schedules make many objects)."""
        if self._timeline is None:
            ev: list[Event] = []
            for r, acts in enumerate(self.schedule.actions):
                ss, ee = self._starts[r], self._ends[r]
                ev.extend(Event(r, a, s, e) for a, s, e in zip(acts, ss.tolist(), ee.tolist()))
            self._timeline = Timeline(ev, self.schedule.num_ranks, self.schedule.name)
        return self._timeline

    @property
    def mean_bubble(self) -> float:
        """Average of ``bubble`` over ranks."""
        return sum(self.bubble) / max(1, len(self.bubble))


def _work(kind: Kind, c: StageCost, split: bool) -> tuple[float, float]:
    """(duration, memory delta) of ``kind`` on a stage costing ``c``; a RECV's duration is -1."""
    if kind is Kind.F:
        return c.forward_time(split), c.act_bytes
    if kind is Kind.B:
        return c.b, -c.act_bytes
    if kind is Kind.I:
        return c.i, -(c.act_bytes - c.held_until_w)
    if kind is Kind.W:
        return c.w, -c.held_until_w
    return (-1.0 if kind in (Kind.RECV_F, Kind.RECV_B) else 0.0), 0.0


def _templates(schedule: Schedule, costs: CostModel, lowered: bool) -> dict[str, list[Template]]:
    """Per kind (by value), per stage: the :class:`Template` built from ``pippy.schedules.ir.needs``.

    A remote need waits for the transfer too: a forward edge (``F`` / ``SEND_F``) carries the
    producer's ``send_bytes``, a gradient edge (``G`` / ``SEND_B``) the waiting stage's
    ``grad_out_bytes``. Comm kinds get templates only when ``lowered``.
    """
    M = schedule.n_microbatches
    place, stages = schedule.stage_to_rank, costs.stages
    needs = need_table(schedule, lowered=lowered)
    split = {a.stage for acts in schedule.actions for a in acts if a.kind is Kind.I}
    overhead = float(costs.overhead)

    def dep(waiting: int, n: Need) -> tuple[int, float]:
        key = (n.stage * _NSLOT + int(n.done)) * M
        if not n.remote:
            return key, 0.0
        nbytes = stages[n.stage].send_bytes if n.done in (Done.F, Done.SEND_F) else stages[waiting].grad_out_bytes
        return key, costs.transfer_time(nbytes)

    table: dict[str, list[Template]] = {}
    for k in Kind:
        if not (lowered or k.is_compute):
            continue
        rows = table[k.value] = []
        for s in range(schedule.num_stages):
            dur, dm = _work(k, stages[s], s in split)
            own = -1 if k.done is None else (s * _NSLOT + int(k.done)) * M
            rows.append(Template(place[s], dur, own, tuple(dep(s, n) for n in needs[k][s]), dm,
                                 overhead if k.is_compute else 0.0))
    return table


def _describe_key(key: int, schedule: Schedule) -> str:
    """Human form of a completion key, e.g. ``1F3 (rank 1)``."""
    M = schedule.n_microbatches
    sk, mb = divmod(key, M)
    stage, slot = divmod(sk, _NSLOT)
    return f"{stage}{_SLOT_NAME[Done(slot)]}{mb} (rank {schedule.stage_to_rank[stage]})"


def simulate(schedule: Schedule, costs: CostModel, *, engine: str = "auto") -> SimResult:
    """Simulate ``schedule`` with ``costs`` (see the module docstring for the rules).

    Raises ``DeadlockError`` naming every stuck rank, its action and what it waits for, and
    ``ValueError`` for actions that do not fit the schedule (stage on the wrong rank,
    micro-batch out of range, a compute action run twice). ``engine`` is ``"python"`` (a
    per-action event loop, best for few ranks), ``"numpy"`` (rounds of array operations over the
    ranks, best for many ranks) or ``"auto"``; both give the same result.

        >>> from pippy.schedules.ir import Schedule, as_actions
        >>> from pippy.sim.cost import CostModel
        >>> s = Schedule("one", [as_actions(["0F0", "0I0", "0W0"])], (0,), 1)
        >>> simulate(s, CostModel.uniform(1, f=1, i=2, w=3)).step_time
        6.0
    """
    if not isinstance(costs, CostModel):
        raise TypeError(f"simulate: costs must be a CostModel (e.g. CostModel.uniform({schedule.num_stages})), "
                        f"got {type(costs).__name__}")
    costs.check()
    if costs.num_stages < schedule.num_stages:
        raise ValueError(
            f"cost model has {costs.num_stages} stages but schedule {schedule.name!r} has "
            f"{schedule.num_stages}; use CostModel.rebin({schedule.num_stages}) or supply more stages"
        )
    if engine not in ("auto", "python", "numpy"):
        raise ValueError(f"engine must be one of auto, python, numpy; got {engine!r}")
    if engine == "numpy" or (engine == "auto" and schedule.num_ranks >= _NUMPY_MIN_RANKS and _HAVE_NUMPY):
        return _run_numpy(schedule, costs)
    try:
        return _run(schedule, costs, lowered=False)
    except NeedsLowered:
        return _run(schedule, costs, lowered=True)


def _static(schedule: Schedule, costs: CostModel) -> list[float]:
    mem = [0.0] * schedule.num_ranks
    for s, r in enumerate(schedule.stage_to_rank):
        if r < schedule.num_ranks:
            mem[r] += costs.stages[s].static_bytes
    return mem


def _run_numpy(schedule: Schedule, costs: CostModel) -> SimResult:
    from pippy.sim._fastsim import run_numpy

    gc_was = gc.isenabled()
    gc.disable()  # millions of short-lived objects; collection passes would dominate
    try:
        try:
            out = run_numpy(schedule, _templates(schedule, costs, False), _static(schedule, costs))
        except NeedsLowered:
            out = run_numpy(schedule, _templates(schedule, costs, True), _static(schedule, costs))
    except Misfit as e:
        a = schedule.actions[e.rank][e.pos]
        if e.duplicate:
            raise ValueError(f"rank {e.rank} runs {a} (position {e.pos}) a second time") from None
        raise ValueError(_misfit(schedule, e.rank, e.pos, a)) from None
    except Stuck as e:
        stuck = [r for r in range(schedule.num_ranks) if e.ptr[r] < len(schedule.actions[r])]
        raise DeadlockError(_deadlock_message(schedule, stuck, e.ptr, e.waiting)) from None
    finally:
        if gc_was:
            gc.enable()
    step = max((float(e[-1]) for e in out["ends"] if len(e)), default=0.0)  # a last overhead is not in the step
    bubble = [0.0 if step <= 0 else 1.0 - b / step for b in out["busy"]]
    return SimResult(schedule, step, bubble, out["busy"], out["peak"], out["starts"], out["ends"])


def _run(schedule: Schedule, costs: CostModel, lowered: bool) -> SimResult:
    R, M = schedule.num_ranks, schedule.n_microbatches
    # plain tuples: unpacking a NamedTuple (a tuple subclass) misses the interpreter's fast path (~3x slower)
    table: dict[str, list[tuple[int, float, int, tuple[tuple[int, float], ...], float, float]]] = {
        k: [(tp.rank, tp.duration, tp.own, tp.deps, tp.mem_delta, tp.overhead) for tp in rows]
        for k, rows in _templates(schedule, costs, lowered).items()
    }
    done = [-1.0] * (schedule.num_stages * _NSLOT * M)
    span, sends = _NSLOT * M, int(Done.SEND_F) * M  # own % span < sends: a compute slot (F, G, W)
    ptr = [0] * R
    free = [0.0] * R
    busy = [0.0] * R
    mem = _static(schedule, costs)
    peak = list(mem)
    starts = [array("d") for _ in range(R)]
    ends = [array("d") for _ in range(R)]
    waiters: dict[int, list[int]] = {}
    waiting_for: dict[int, int] = {}
    ready = list(range(R - 1, -1, -1))
    a: Action | None = None
    r = -1
    try:
        while ready:
            r = ready.pop()
            acts = schedule.actions[r]
            n, p, t, bz, m, pk = len(acts), ptr[r], free[r], busy[r], mem[r], peak[r]
            ss, ee = starts[r], ends[r]
            while p < n:
                a = acts[p]
                mb = a.mb
                rr, dur, own, deps, dm, ov = table[a.kind._value_][a.stage]
                if rr != r or not 0 <= mb < M:
                    raise ValueError(_misfit(schedule, r, p, a))
                st = t
                for kb, dl in deps:
                    e = done[kb + mb]
                    if e < 0.0:
                        break
                    e += dl
                    if e > st:
                        st = e
                else:
                    if dur < 0.0:  # RECV: blocked from t until arrival
                        en, st = st, t
                    else:
                        en = st + dur
                        bz += dur
                        k = own + mb
                        if done[k] >= 0.0 and own % span < sends:
                            raise ValueError(f"rank {r} runs {a} (position {p}) a second time")
                        done[k] = en + ov  # the runtime's own work comes first (posting the sends, ...)
                        if k in waiters:
                            ready.extend(waiters.pop(k))
                    ss.append(st)
                    ee.append(en)
                    t = en + ov
                    p += 1
                    if dm:
                        m += dm
                        if m > pk:
                            pk = m
                    continue
                waiters.setdefault(kb + mb, []).append(r)
                waiting_for[r] = kb + mb
                break
            ptr[r], free[r], busy[r], mem[r], peak[r] = p, t, bz, m, pk
    except KeyError:
        if a is not None and a.kind.is_comm and not lowered:
            raise NeedsLowered() from None
        raise
    except IndexError:
        raise ValueError(_misfit(schedule, r, ptr[r], a)) from None
    stuck = [r for r in range(R) if ptr[r] < len(schedule.actions[r])]
    if stuck:
        raise DeadlockError(_deadlock_message(schedule, stuck, ptr, waiting_for))
    step = max((e[-1] for e in ends if e), default=0.0)  # the last action's overhead is not in the step
    bubble = [0.0 if step <= 0 else 1.0 - b / step for b in busy]
    return SimResult(schedule, step, bubble, busy, peak, starts, ends)


def _misfit(schedule: Schedule, r: int, p: int, a: Action | None) -> str:
    if a is None:
        return f"rank {r}: bad action at position {p}"
    if not 0 <= a.stage < schedule.num_stages:
        return f"rank {r} action {p} ({a}): stage {a.stage} out of range 0..{schedule.num_stages - 1}"
    if not 0 <= a.mb < schedule.n_microbatches:
        return f"rank {r} action {p} ({a}): micro-batch {a.mb} out of range 0..{schedule.n_microbatches - 1}"
    return f"rank {r} action {p} ({a}): stage {a.stage} lives on rank {schedule.stage_to_rank[a.stage]}, not {r}"


def _deadlock_message(schedule: Schedule, stuck: list[int], ptr: list[int], waiting_for: dict[int, int]) -> str:
    lines = [f"deadlock in schedule {schedule.name!r}: {len(stuck)} rank(s) cannot progress"]
    for r in stuck[:16]:
        a = schedule.actions[r][ptr[r]]
        key = waiting_for.get(r)
        what = "?" if key is None else _describe_key(key, schedule)
        lines.append(f"  rank {r} at action {ptr[r]} ({a}) waits for {what}, which has not run")
    if len(stuck) > 16:
        lines.append(f"  ... and {len(stuck) - 16} more ranks")
    return "\n".join(lines)

"""Event simulation of a Schedule under a CostModel: timeline, step time, bubble and peak memory.

Each rank runs its actions in order. An action starts when its rank is free and every input has
arrived: an input made on another rank arrives ``latency + bytes / bandwidth`` after its producer
ends (or, in a lowered schedule, after the producer's SEND); inputs from the same rank are ready
when their action has ended. ``RECV`` actions block until their message arrives; ``SEND`` actions
take no time. Compute-only and lowered schedules are both accepted. Durations come from the
CostModel: ``B`` takes ``b``, ``I`` and ``W`` their own, and ``F`` takes ``split_f`` on the stages
whose backward the schedule splits (those with an ``I`` action), ``f`` elsewhere.

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

from pippy.schedules.ir import Action, Kind, Schedule
from pippy.sim.cost import CostModel
from pippy.sim.timeline import Event, Timeline

__all__ = ["DeadlockError", "SimResult", "simulate"]

# Completion slots: a key is (stage * _NSLOT + slot) * n_microbatches + mb.
_F, _G, _W, _SF, _SB = 0, 1, 2, 3, 4  # forward, input-grad (B or I), weight-grad, SEND_F, SEND_B
_NSLOT = 5
_NUMPY_MIN_RANKS = 16  # below this the per-action loop wins (numpy rounds cost ~50 us each)
try:
    import numpy  # noqa: F401

    _HAVE_NUMPY = True
except ImportError:  # pragma: no cover - numpy ships with most torch installs
    _HAVE_NUMPY = False
_SLOT_NAME = {_F: "F", _G: "B/I", _W: "W", _SF: "SEND_F", _SB: "SEND_B"}


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


class _Lowered(Exception):
    """Internal: a comm action showed up while simulating in compute-only mode."""


def _templates(schedule: Schedule, costs: CostModel, lowered: bool) -> dict[str, list[tuple]]:
    """Per kind, per stage: (rank, duration, own key base, deps ((key base, delay), ...), mem delta)."""
    S, M = schedule.num_stages, schedule.n_microbatches
    place = schedule.stage_to_rank
    cons = schedule.consumers()

    def base(stage: int, slot: int) -> int:
        return (stage * _NSLOT + slot) * M

    def xfer(nbytes: float) -> float:
        return costs.transfer_time(nbytes)

    table: dict[str, list[tuple]] = {k.value: [] for k in Kind if lowered or k.is_compute}
    split = {a.stage for acts in schedule.actions for a in acts if a.kind is Kind.I}
    for s in range(S):
        c = costs.stages[s]
        r = place[s]
        # inputs of F(s): outputs of deps; inputs of B/I(s): gradients from consumers + own F
        f_in = [
            (base(d, _F), 0.0) if place[d] == r else (base(d, _SF if lowered else _F), xfer(costs.stages[d].send_bytes))
            for d in schedule.deps.get(s, ())
        ]
        g_in = [
            (base(q, _G), 0.0) if place[q] == r else (base(q, _SB if lowered else _G), xfer(c.grad_out_bytes))
            for q in cons.get(s, ())
        ]
        f_remote = tuple(x for d, x in zip(schedule.deps.get(s, ()), f_in) if place[d] != r)
        g_remote = tuple(x for q, x in zip(cons.get(s, ()), g_in) if place[q] != r)
        table["F"].append((r, c.forward_time(s in split), base(s, _F), tuple(f_in), c.act_bytes))
        table["B"].append((r, c.b, base(s, _G), ((base(s, _F), 0.0), *g_in), -c.act_bytes))
        table["I"].append((r, c.i, base(s, _G), ((base(s, _F), 0.0), *g_in), -(c.act_bytes - c.held_until_w)))
        table["W"].append((r, c.w, base(s, _W), ((base(s, _G), 0.0),), -c.held_until_w))
        if lowered:  # duration -1 marks a RECV: it spans from "rank free" to "message arrived"
            table["SEND_F"].append((r, 0.0, base(s, _SF), ((base(s, _F), 0.0),), 0.0))
            table["SEND_B"].append((r, 0.0, base(s, _SB), ((base(s, _G), 0.0),), 0.0))
            table["RECV_F"].append((r, -1.0, -1, f_remote, 0.0))
            table["RECV_B"].append((r, -1.0, -1, g_remote, 0.0))
    return table


def _describe_key(key: int, schedule: Schedule) -> str:
    """Human form of a completion key, e.g. ``1F3 (rank 1)``."""
    M = schedule.n_microbatches
    sk, mb = divmod(key, M)
    stage, slot = divmod(sk, _NSLOT)
    return f"{stage}{_SLOT_NAME[slot]}{mb} (rank {schedule.stage_to_rank[stage]})"


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
    except _Lowered:
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
            out = run_numpy(schedule, _templates(schedule, costs, False), _NSLOT, _static(schedule, costs))
        except KeyError:
            out = run_numpy(schedule, _templates(schedule, costs, True), _NSLOT, _static(schedule, costs))
    except IndexError as e:
        what, r, p = e.args[0]
        a = schedule.actions[r][p]
        if what == "dup":
            raise ValueError(f"rank {r} runs {a} (position {p}) a second time") from None
        raise ValueError(_misfit(schedule, r, p, a)) from None
    except LookupError as e:
        _, ptr, waiting = e.args[0]
        stuck = [r for r in range(schedule.num_ranks) if ptr[r] < len(schedule.actions[r])]
        raise DeadlockError(_deadlock_message(schedule, stuck, ptr, waiting)) from None
    finally:
        if gc_was:
            gc.enable()
    step = max(out["free"], default=0.0)
    bubble = [0.0 if step <= 0 else 1.0 - b / step for b in out["busy"]]
    return SimResult(schedule, step, bubble, out["busy"], out["peak"], out["starts"], out["ends"])


def _run(schedule: Schedule, costs: CostModel, lowered: bool) -> SimResult:
    R, M = schedule.num_ranks, schedule.n_microbatches
    table = _templates(schedule, costs, lowered)
    done = [-1.0] * (schedule.num_stages * _NSLOT * M)
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
                rr, dur, own, deps, dm = table[a.kind._value_][a.stage]
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
                        if done[k] >= 0.0 and own % (_NSLOT * M) < _SF * M:
                            raise ValueError(f"rank {r} runs {a} (position {p}) a second time")
                        done[k] = en
                        if k in waiters:
                            ready.extend(waiters.pop(k))
                    ss.append(st)
                    ee.append(en)
                    t = en
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
            raise _Lowered() from None
        raise
    except IndexError:
        raise ValueError(_misfit(schedule, r, ptr[r], a)) from None
    stuck = [r for r in range(R) if ptr[r] < len(schedule.actions[r])]
    if stuck:
        raise DeadlockError(_deadlock_message(schedule, stuck, ptr, waiting_for))
    step = max(free, default=0.0)
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

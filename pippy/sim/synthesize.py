"""Schedule synthesis: build a schedule for measured costs and a per-rank memory limit, judged by the simulator.

A cost-aware list scheduler runs the pipeline in simulated time: whenever a rank is free it
starts the action its rule prefers among those whose inputs have arrived. The rules are a small
family (how many micro-batches may be in flight, whether a backward is split with its W deferred
to fill waits or run whole, whether a W may delay an action about to arrive, which forward goes
first), in the spirit of the Zero Bubble paper's heuristic. Each candidate is validated and
simulated as the runtime runs it (:func:`~pippy.schedules.lower.runtime_form`); the fastest
whose peak memory fits the limit wins. Placements: one stage per rank, the V shape (2 per rank)
and the interleaved loop.

    >>> from pippy.sim.cost import CostModel
    >>> syn = synthesize(4, 8, CostModel.uniform(8))          # 8 stages on 4 ranks
    >>> syn.schedule.name, syn.step_time <= syn.best_fixed_time
    ('synth', True)
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from pippy.schedules.generators import make_schedule
from pippy.schedules.ir import Action, Kind, Schedule, loop_placement, v_placement
from pippy.schedules.lower import runtime_form
from pippy.schedules.validate import ScheduleError, validate
from pippy.sim.compact import compact_w
from pippy.sim.cost import CostModel
from pippy.sim.simulate import DeadlockError, simulate

__all__ = ["Rule", "Synthesis", "list_schedule", "synthesize"]

F, IG, W = Kind.F, Kind.I, Kind.W


@dataclass(frozen=True, slots=True)
class Rule:
    """One priority rule of the list scheduler.

    ``cap``: most stage-micro-batches a rank holds between F and its backward's end (None: only
    the memory limit bounds it). ``split``: backward as I then a deferred W that fills waits
    (False: I directly followed by its W, run as one whole B). ``w_slack``: a W starts in a wait
    only when the next action arrives at least ``w_slack`` × its time later (0: always fill).
    ``late_first``: among ready forwards, the later stage first (drains the V's second leg).
    ``f_first``: a ready forward goes before a ready backward while memory allows (breadth first, as
    GPipe and looped BFS); otherwise backwards first (depth first, as 1F1B).
    """

    cap: int | None
    split: bool
    w_slack: float = 0.0
    late_first: bool = True
    f_first: bool = False

    def __str__(self) -> str:
        cap = "mem" if self.cap is None else str(self.cap)
        order = "F-first" if self.f_first else "B-first"
        return (f"cap={cap},{'split' if self.split else 'whole'},w_slack={self.w_slack:g},"
                f"{'late' if self.late_first else 'early'},{order}")


@dataclass(slots=True)
class Synthesis:
    """The synthesized schedule, its predicted step time and peak memory, and what it was judged against."""

    schedule: Schedule
    step_time: float
    peak_memory: float
    rule: str  # the winning rule, or the fixed schedule's name when no built one beat it
    built: bool  # True when the list scheduler's schedule won (False: a fixed one was no slower)
    best_fixed: str | None
    best_fixed_time: float
    tried: list[tuple[str, float, float]] = field(default_factory=list)  # (candidate, step time, peak memory)

    def __repr__(self) -> str:
        """The winner, its time and memory, the best fixed schedule and how many were tried (not every action).

            >>> from pippy.sim.cost import CostModel
            >>> repr(synthesize(2, 4, CostModel.uniform(2)))[:10], len(repr(synthesize(8, 32, CostModel.uniform(8)))) < 400
            ('Synthesis(', True)
        """
        return (f"Synthesis(rule={self.rule!r}, built={self.built}, step_time={self.step_time:g}, peak_memory="
                f"{self.peak_memory:g}, best_fixed={self.best_fixed!r} at {self.best_fixed_time:g}, "
                f"{len(self.tried)} tried, {self.schedule!r})")


def list_schedule(p: int, m: int, placement: tuple[int, ...], costs: CostModel, rule: Rule,
                  memory_limit: float | None = None) -> Schedule:
    """Rank programs from running the pipeline in simulated time under ``rule`` (see :class:`Rule`).

    A stage's forward of micro-batch ``i`` waits for the previous stage's (plus the link when they
    sit on different ranks); its backward waits for the next stage's. Activation bytes count from
    F to the end of the backward; a forward that would pass ``memory_limit`` (per rank, with the
    stages' static bytes) waits. Raises ``RuntimeError`` when the limit leaves no way forward.

        >>> s = list_schedule(2, 2, (0, 1), CostModel.uniform(2), Rule(cap=None, split=True))
        >>> [str(a) for a in s.actions[0]]        # 0W0 fills the wait for 0I1's gradient
        ['0F0', '0F1', '0I0', '0W0', '0I1', '0W1']
    """
    n = len(placement)
    cost = costs.stages
    local = [[s for s in range(n) if placement[s] == r] for r in range(p)]
    link = [costs.transfer_time(c.send_bytes) for c in cost]
    glink = [costs.transfer_time(c.grad_out_bytes) for c in cost]
    static = [sum(cost[s].static_bytes for s in local[r]) for r in range(p)]
    fin: dict[tuple[int, Kind, int], float] = {}
    nf, ni = [0] * n, [0] * n
    pend: list[deque[tuple[int, int]]] = [deque() for _ in range(p)]
    held, live = [0.0] * p, [0] * p
    clock = [0.0] * p
    acts: list[list[Action]] = [[] for _ in range(p)]
    left = [3 * m * len(local[r]) for r in range(p)]  # F, I and W of each (stage, micro-batch)
    turn = [0] * p  # tie-break: a rank that found nothing to do lets the others at the same time go first
    stalled = 0

    def f_ready(s: int) -> float | None:
        i = nf[s]
        if i >= m:
            return None
        if s == 0:
            return 0.0
        t = fin.get((s - 1, F, i))
        return None if t is None else t + (link[s - 1] if placement[s - 1] != placement[s] else 0.0)

    def i_ready(s: int) -> float | None:
        i = ni[s]
        if i >= nf[s]:
            return None
        t = fin[(s, F, i)]
        if s == n - 1:
            return t
        g = fin.get((s + 1, IG, i))
        return None if g is None else max(t, g + (glink[s] if placement[s + 1] != placement[s] else 0.0))

    def fits(r: int, s: int) -> bool:
        if rule.cap is not None and live[r] >= rule.cap:
            return False
        return memory_limit is None or static[r] + held[r] + cost[s].act_bytes <= memory_limit or live[r] == 0

    def run(r: int, a: Action, start: float) -> None:
        c = cost[a.stage]
        dur = {F: c.forward_time(rule.split), IG: c.i if rule.split else c.b, W: c.w}[a.kind]
        clock[r] = start + dur
        fin[(a.stage, a.kind, a.mb)] = clock[r]
        acts[r].append(a)
        left[r] -= 1
        if a.kind is F:
            nf[a.stage] += 1
            live[r] += 1
            held[r] += c.act_bytes
        elif a.kind is IG:
            ni[a.stage] += 1
            if rule.split:
                pend[r].append((a.stage, a.mb))
                held[r] -= c.act_bytes - c.held_until_w
            else:
                live[r] -= 1
                held[r] -= c.act_bytes
        else:
            live[r] -= 1
            held[r] -= c.held_until_w

    while any(left):
        r = min((x for x in range(p) if left[x]), key=lambda x: (clock[x], turn[x], x))
        now = clock[r]
        ready_i = [(t, ni[s], -s, s) for s in local[r] if (t := i_ready(s)) is not None]
        ready_f = [(t, -s if rule.late_first else s, nf[s], s) for s in local[r] if (t := f_ready(s)) is not None]
        ready_f = [x for x in ready_f if fits(r, x[3])]
        due = [x for x in ready_i if x[0] <= now]
        due_f = [x for x in ready_f if x[0] <= now]
        nxt = min([x[0] for x in ready_i] + [x[0] for x in ready_f], default=math.inf)  # next known arrival
        if due and not (rule.f_first and due_f):
            _, i, _, s = min(due, key=lambda x: (x[1], x[2]))
            run(r, Action(s, IG, i), now)
            if not rule.split:  # whole: the W at once (the runtime runs the pair as one B)
                fin[(s, W, i)] = clock[r]
                left[r] -= 1
                acts[r].append(Action(s, W, i))
        elif due_f:
            _, _, i, s = min(due_f, key=lambda x: (x[1], x[2]))
            run(r, Action(s, F, i), now)
        elif pend[r] and nxt - now >= rule.w_slack * cost[pend[r][0][0]].w:  # fill the wait with a W
            s, i = pend[r].popleft()
            run(r, Action(s, W, i), now)
        else:
            later = [clock[x] for x in range(p) if x != r and left[x] and clock[x] > now]
            if any(left[x] and clock[x] <= now for x in range(p) if x != r):
                turn[r] += 1  # others may still act at this time: let them
                stalled += 1
                if stalled <= 2 * p:
                    continue
            wake = min([nxt, *later], default=math.inf)
            if math.isinf(wake):
                if pend[r]:
                    s, i = pend[r].popleft()
                    run(r, Action(s, W, i), now)
                    stalled = 0
                    continue
                raise RuntimeError(f"list_schedule: no rank can move at t={now:g} under {rule} (memory limit "
                                   f"{memory_limit}): the in-flight cap or the memory limit leaves no way forward")
            clock[r] = wake
            continue
        stalled = 0
    return Schedule("synth", acts, placement, m)


def _placements(p: int, n: int) -> list[tuple[str, tuple[int, ...]]]:
    if n == p:
        return [("loop", loop_placement(p))]
    if n % p:
        return []
    out = [(f"interleaved v={n // p}", loop_placement(p, n // p))]
    if n == 2 * p:
        out.insert(0, ("V", v_placement(p)))
    return out


_FIXED = {1: ("gpipe", "1f1b", "zb_h1", "zb_h2"), 2: ("interleaved_1f1b", "looped_bfs", "zbv", "dualpipev")}
_LOOPED = ("interleaved_1f1b", "looped_bfs")  # the fixed schedules that take v > 2 stages per rank


def _rules(p: int, stages_per_rank: int) -> Iterable[Rule]:
    caps: list[int | None] = [None, *sorted({p * stages_per_rank, (p + 1) * stages_per_rank, 2 * p * stages_per_rank})]
    for cap, split, slack, late, f_first in itertools.product(caps, (True, False), (0.0, 0.5, 1.0), (True, False),
                                                             (False, True)):
        if not split and slack:
            continue  # no W waits to fill
        yield Rule(cap, split, slack, late, f_first)


def synthesize(p: int, m: int, costs: CostModel, *, memory_limit: float | None = None,
               gradless_stages: Iterable[int] = (0,), placement: tuple[int, ...] | None = None) -> Synthesis:
    """The fastest schedule the list scheduler builds for ``costs`` on ``p`` ranks, within ``memory_limit``.

    ``costs.num_stages`` fixes the stage count (``p``: one per rank; ``2p``: the V shape or the
    interleaved loop; ``kp``: the interleaved loop); ``placement`` keeps only that one (stage -> rank).
    ``gradless_stages``: as in :func:`~pippy.schedules.lower.runtime_form`. The fixed schedules are
    simulated too, for the record (``best_fixed``): a synthesized schedule is kept only when faster
    than the best of them that fits (else that one is returned, under its own name; ``built`` False).

        >>> from pippy.sim.cost import CostModel
        >>> syn = synthesize(2, 4, CostModel.uniform(2))
        >>> syn.step_time <= syn.best_fixed_time, syn.best_fixed
        (True, 'zb_h1')
    """
    for name, v in (("p (ranks)", p), ("m (micro-batches)", m)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"synthesize: {name} must be an int >= 1, got {v!r}")
    if memory_limit is not None and not memory_limit >= 0:
        raise ValueError(f"synthesize: memory_limit must be a number of bytes >= 0 or None, got {memory_limit!r}")
    costs.check()
    n = costs.num_stages
    places = _placements(p, n)
    if placement is not None:
        places = [(name, pl) for name, pl in places if pl == tuple(placement)]
    if not places:
        have = ", ".join(f"{name} {list(pl)}" for name, pl in _placements(p, n)) or "none"
        raise ValueError(f"synthesize: no placement of {n} stages on {p} ranks matches {placement}; expected a "
                         f"multiple of {p} stages placed as one of: {have}")
    gradless = tuple(gradless_stages)
    tried: list[tuple[str, float, float]] = []
    best: tuple[float, float, Schedule, str, bool] | None = None

    def judge(label: str, sch: Schedule, built: bool) -> tuple[float, float] | None:
        nonlocal best
        try:
            validate(sch)
            res = simulate(compact_w(runtime_form(sch, gradless), costs), costs)  # as the runtime runs it
        except (ScheduleError, DeadlockError):
            return None
        peak = max(res.peak_memory)
        tried.append((label, res.step_time, peak))
        if memory_limit is not None and peak > memory_limit:
            return None
        if best is None or res.step_time < best[0] - 1e-12:
            best = (res.step_time, peak, sch, label, built)
        return res.step_time, peak

    fixed_best: tuple[float, str] | None = None
    v = n // p
    fixed = [(name, {}) for name in _FIXED[v]] if v <= 2 else [(name, {"v": v}) for name in _LOOPED]
    for name, options in fixed:
        try:
            sch = make_schedule(name, p, m, **options)
        except (ValueError, ScheduleError):
            continue
        if sch.num_stages != n or (placement is not None and sch.stage_to_rank != tuple(placement)):
            continue
        got = judge(name, sch, False)
        if got is not None and (fixed_best is None or got[0] < fixed_best[0]):
            fixed_best = (got[0], name)
    for pname, layout in places:
        for rule in _rules(p, n // p):
            try:
                sch = list_schedule(p, m, layout, costs, rule, memory_limit)
            except RuntimeError:
                continue
            judge(f"{pname} {rule}", sch, True)
    if best is None:
        smallest = min((peak for _, _, peak in tried), default=None)
        seen = "" if smallest is None else f" (the smallest predicted peak was {smallest:g})"
        raise ValueError(f"synthesize: no schedule for p={p}, m={m} fits memory_limit={memory_limit} bytes per rank"
                         f"{seen}; raise the limit or use more micro-batches (smaller ones)")
    t, peak, sch, label, built = best
    return Synthesis(sch, t, peak, label, built, fixed_best[1] if fixed_best else None,
                     fixed_best[0] if fixed_best else math.inf, tried)

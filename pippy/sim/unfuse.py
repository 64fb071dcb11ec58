"""Split a whole backward (B) into I and W only where the simulator says the step gets shorter.

A fused form runs every I directly followed by its W as one B, which is cheaper than the pair
when ``fused_b < i + w`` (on CPU). But a B holds back its input gradient until the weight
gradient is done too, and in the cool-down of a V (ZB-V, DualPipeV) that gradient is the chain
every rank below waits for. :func:`split_where_faster` tries each B in turn as an I followed by
its W, the W either right after the I or as late as the stage's gradient order allows (before the
stage's next B or W) for :func:`~pippy.sim.compact.compact_w` to move into the first idle gap it
fits. It keeps the faster of the two when it shortens the simulated step and no rank's peak memory
grows (a late W holds its micro-batch's activations), and sweeps until a sweep keeps nothing.
Under the default costs (F = I = W = 1, B = 1.5) this takes ZB-V from 49.5 to its bound of 47 for
p = 4, m = 8.

Splitting only changes which backward actions a rank runs, not what it sends or in which order,
and a W never passes a B or W of its stage: every parameter sums its micro-batch gradients in the
same order. A split stage runs its forwards through the tapped graph that split backward needs,
which computes the same values (the tests compare with the fused form within 1e-13 in float64).

    >>> from pippy.schedules.zero_bubble import zbv
    >>> from pippy.schedules.lower import runtime_form
    >>> from pippy.sim.choose import default_costs
    >>> from pippy.sim.simulate import simulate
    >>> form, costs = compact_w(runtime_form(zbv(4, 8)), default_costs(8)), default_costs(8)
    >>> simulate(form, costs).step_time, simulate(split_where_faster(form, costs), costs).step_time
    (49.5, 47.0)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from pippy.schedules.ir import Action, Kind, Schedule
from pippy.sim.compact import compact_w
from pippy.sim.cost import CostModel
from pippy.sim.simulate import simulate

__all__ = ["split_where_faster"]

MAX_ACTIONS = 2000  # larger schedules are returned as given: each try simulates the whole step


def split_where_faster(form: Schedule, costs: CostModel, *, gradless_stages: Iterable[int] = (0,),
                       max_tries: int = 512) -> Schedule:
    """``form`` (compute-only, as the runtime runs it) with the B's split into I + W that shorten the step.

    ``gradless_stages`` (whose inputs need no gradient) keep their B's: an I there computes nothing
    anyone waits for. At most ``max_tries`` splits are simulated, and schedules of more than
    ``MAX_ACTIONS`` compute actions are returned unchanged, so the cost stays bounded; the result is
    the same on every rank given the same costs. Returns ``form`` itself when no split helps.

        >>> from pippy.schedules.ir import as_actions
        >>> s = Schedule("one", [as_actions(["0F0", "0B0"])], (0,), 1)
        >>> split_where_faster(s, CostModel.uniform(1)) is s   # nothing waits on stage 0's input gradient
        True
    """
    if sum(len(r) for r in form.actions) > MAX_ACTIONS:
        return form
    gradless = set(gradless_stages)
    start = simulate(form, costs)
    best, best_time, cap = form, start.step_time, [m * (1 + 1e-12) for m in start.peak_memory]
    tries = 0
    kept = True
    while kept and tries < max_tries:
        kept = False
        for r in range(best.num_ranks):
            k = 0
            while k < len(best.actions[r]) and tries < max_tries:
                a = best.actions[r][k]
                k += 1
                if a.kind is not Kind.B or a.stage in gradless:
                    continue
                won: tuple[float, Schedule] | None = None
                for split in _splits(best, r, k - 1, a):  # W right after its I, or late: the faster that fits
                    cand = compact_w(split, costs)
                    tries += 1
                    res = simulate(cand, costs)
                    if all(m <= c for m, c in zip(res.peak_memory, cap)) and (won is None or res.step_time < won[0]):
                        won = (res.step_time, cand)
                if won is not None and won[0] < best_time - 1e-12 * max(1.0, best_time):
                    best_time, best = won
                    kept = True
    return best


def _splits(s: Schedule, r: int, k: int, b: Action) -> list[Schedule]:
    """``s`` with rank ``r``'s B at ``k`` split: its W right after the I, or as late as the stage's order allows."""
    out = []
    row = list(s.actions[r])
    row[k] = Action(b.stage, Kind.I, b.mb)
    # before the stage's next B or W: W's of a stage keep their order, so the grads sum in the same order
    nxt = next((j for j in range(k + 1, len(row)) if row[j].stage == b.stage and row[j].kind in (Kind.B, Kind.W)),
               len(row))
    for at in dict.fromkeys((k + 1, nxt)):
        acts = [list(x) for x in s.actions]
        acts[r] = [*row[:at], Action(b.stage, Kind.W, b.mb), *row[at:]]
        out.append(replace(s, actions=acts))
    return out

"""Local search over each rank's order: move an action a few places earlier where the simulator says the step gets shorter.

Generators order actions from a coarse model (unit time steps, equal stages). Under measured costs
(a heavier last stage, a cheaper first one) a rank can sit idle waiting for one stage's message
while another stage's action it holds could already run. :func:`reorder_where_faster` tries, on
every rank, moving each action up to ``reach`` places earlier, and keeps a move when the simulated
step gets shorter and no rank's peak memory grows, neither in bytes under the costs nor in micro-batches
in flight; it sweeps until a sweep keeps nothing or its
budget of tries is spent. Under the GPT-2 costs of ``benchmarks/vs_torch_pipelining.py`` cut into 8
stages for p = 4, m = 8 this takes ZB-V from 4.8% above its lower bound to 2.7%, and DualPipeV to
2.0%, at the same peak memory on every rank.

An action never passes another of its own stage that is of the same kind or the same
micro-batch, nor, when both add into the parameters' ``.grad`` (B and W), any of its stage: each
stage runs its F's, I's, B's and W's in the order generated, so every parameter sums its
micro-batch gradients in the same order and results equal the generated order's bitwise. Forwards
of different stages on a rank may change order; a model that draws random numbers in its forward
(dropout) draws them in the new order. The same costs give the same order on every rank, and the
runtime posts sends in each peer's receive order on ordered transports
(:mod:`pippy.runtime.sendorder`), so ranks still match each other's messages.

    >>> from pippy.schedules.ir import Schedule, as_actions
    >>> from pippy.sim.cost import CostModel, StageCost
    >>> s = Schedule("v", [as_actions(["0F0", "3F0", "0F1", "3F1", "3B0", "3B1", "0B0", "0B1"]),
    ...                    as_actions(["1F0", "2F0", "1F1", "2F1", "2B0", "1B0", "2B1", "1B1"])], (0, 1, 1, 0), 2)
    >>> c = CostModel(stages=[StageCost(f=1, i=1, w=1), StageCost(f=1, i=1, w=1), StageCost(f=1, i=1, w=1),
    ...                       StageCost(f=3, i=3, w=3)])
    >>> [str(a) for a in reorder_where_faster(s, c).actions[0]]
    ['0F0', '0F1', '3F0', '3F1', '3B0', '3B1', '0B0', '0B1']
"""

from __future__ import annotations

from dataclasses import replace

from pippy.schedules.ir import Action, Kind, Schedule
from pippy.sim.cost import CostModel
from pippy.sim.simulate import DeadlockError, simulate

__all__ = ["reorder_where_faster"]

MAX_ACTIONS = 1000  # larger schedules are returned as given: each try simulates the whole step
_GRAD = (Kind.B, Kind.W)  # the kinds that add into a parameter's .grad


def may_pass(a: Action, b: Action) -> bool:
    """Whether ``a`` may move before ``b`` on its rank (see the module docstring).

        >>> may_pass(Action.parse("1F2"), Action.parse("1B0")), may_pass(Action.parse("1W2"), Action.parse("1B0"))
        (True, False)
    """
    if a.stage != b.stage:
        return True
    return a.mb != b.mb and a.kind is not b.kind and not (a.kind in _GRAD and b.kind in _GRAD)


def reorder_where_faster(schedule: Schedule, costs: CostModel, *, reach: int = 8, max_tries: int = 1000) -> Schedule:
    """``schedule`` (compute-only) with actions moved earlier on their rank where the simulated step gets shorter.

    Each kept move shortens the step under ``costs`` and leaves every rank's peak memory at most what
    it was. At most ``max_tries`` moves are simulated, and schedules of more than ``MAX_ACTIONS``
    actions are returned unchanged, so the cost stays bounded (under two seconds at 1000 actions);
    the result depends only on the schedule and the costs. Returns ``schedule`` itself when no move
    helps.

        >>> from pippy.schedules.ir import as_actions
        >>> s = Schedule("one", [as_actions(["0F0", "0F1", "0B0", "0B1"])], (0,), 2)
        >>> reorder_where_faster(s, CostModel.uniform(1)) is s   # one stage on one rank: nothing may move
        True
    """
    if sum(len(r) for r in schedule.actions) > MAX_ACTIONS:
        return schedule
    start = simulate(schedule, costs)
    best_time, cap = start.step_time, [m * (1 + 1e-12) for m in start.peak_memory]
    # micro-batches in flight too: costs without activation bytes (times only) would let memory grow unseen
    count = replace(costs, stages=[replace(c, act_bytes=1.0, w_act_bytes=None, static_bytes=0.0) for c in costs.stages])
    held = simulate(schedule, count).peak_memory
    rows = [list(r) for r in schedule.actions]
    tries, kept_any, kept = 0, False, True
    while kept and tries < max_tries:
        kept = False
        for r in range(len(rows)):
            for k in range(1, len(rows[r])):
                a = rows[r][k]
                for j in range(k - 1, max(-1, k - 1 - reach), -1):
                    if tries >= max_tries or not may_pass(a, rows[r][j]):
                        break
                    row = [*rows[r][:j], a, *rows[r][j:k], *rows[r][k + 1:]]
                    cand = replace(schedule, actions=[row if q == r else rows[q] for q in range(len(rows))])
                    tries += 1
                    try:
                        res = simulate(cand, costs)
                    except DeadlockError:  # it now waits for something that waits for it
                        continue
                    if res.step_time < best_time - 1e-12 * max(1.0, best_time) and all(
                            m <= c for m, c in zip(res.peak_memory, cap)) and all(
                            m <= c for m, c in zip(simulate(cand, count).peak_memory, held)):
                        rows[r], best_time, kept, kept_any = row, res.step_time, True, True
                        break
    if not kept_any:
        return schedule
    return replace(schedule, actions=rows)

"""The lower bound never exceeds a simulated step, and is tight where the order is optimal."""

from __future__ import annotations

import random

import pytest

from pippy.schedules.generators import SCHEDULES, make_schedule
from pippy.sim.bound import lower_bound
from pippy.sim.cost import CostModel, StageCost
from pippy.sim.simulate import simulate


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_bound_never_exceeds_the_simulated_step(name: str) -> None:
    for p in (2, 3, 4):
        for m in range(p, 2 * p + 2):
            try:
                s = make_schedule(name, p, m)
            except ValueError:  # e.g. DualPipeV's m >= 2p - 1
                continue
            for seed in range(4):
                rnd = random.Random(seed)
                stages = [StageCost(f=rnd.uniform(0.5, 2), i=rnd.uniform(0.5, 2), w=rnd.uniform(0.2, 2),
                                    fused_b=rnd.choice([None, rnd.uniform(0.8, 3)]),
                                    split_f=rnd.choice([None, rnd.uniform(0.5, 2.5)])) for _ in range(s.num_stages)]
                costs = CostModel(stages=stages, latency=rnd.uniform(0, 0.3))
                assert lower_bound(s, costs) <= simulate(s, costs).step_time + 1e-9, (name, p, m, seed)


def test_known_bounds_under_unit_costs() -> None:
    unit = CostModel.uniform(4, f=1, i=1, w=1)
    assert lower_bound(make_schedule("1f1b", 4, 8), unit) == 33.0  # 1F1B is optimal for its actions
    zbv = make_schedule("zbv", 4, 8)
    half = CostModel.uniform(8, f=0.5, i=0.5, w=0.5)
    assert lower_bound(zbv, half) == 25.5  # the V placement's bound the issue quotes
    one = make_schedule("1f1b", 1, 3)
    assert lower_bound(one, CostModel.uniform(1)) == simulate(one, CostModel.uniform(1)).step_time == 9.0

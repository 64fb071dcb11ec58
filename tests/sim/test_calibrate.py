"""Calibration from a traced step: the durations the run measured replace the profile's, per stage and kind."""

from __future__ import annotations

import pytest

from pippy.schedules.generators import one_f_one_b, zb_h1
from pippy.schedules.ir import Action
from pippy.schedules.lower import lower, runtime_form
from pippy.sim.calibrate import calibrate, traced_latency, traced_overhead
from pippy.sim.cost import CostModel, StageCost
from pippy.sim.simulate import simulate
from pippy.sim.timeline import Event, Timeline


def _costs(scale: float) -> CostModel:
    return CostModel(stages=[StageCost(f=1.0 * scale, i=1.2 * scale, w=0.8 * scale, fused_b=1.7 * scale,
                                       split_f=1.1 * scale, act_bytes=5.0, send_bytes=2.0) for _ in range(3)],
                     latency=0.05, bandwidth=100.0)


@pytest.mark.parametrize("sched", [one_f_one_b(3, 6), runtime_form(zb_h1(3, 6), (), fuse=False)])
def test_a_trace_of_a_slower_run_gives_its_costs_back(sched) -> None:
    profiled, real = _costs(1.0), _costs(1.3)  # the run is 30% slower than the profile said
    measured = simulate(sched, real).timeline
    cal = calibrate(profiled, measured)
    assert simulate(sched, cal).step_time == pytest.approx(measured.step_time)
    assert simulate(sched, profiled).step_time < 0.9 * measured.step_time
    st = cal.stages[1]
    assert cal.latency == 0.05 and st.act_bytes == 5.0  # no SEND/RECV in this trace: the link stays the profile's; sizes too
    split = sched.uses_split_backward()
    assert st.forward_time(split) == pytest.approx(real.stages[1].forward_time(split))


def test_kinds_the_trace_did_not_run_scale_with_those_it_did() -> None:
    measured = simulate(one_f_one_b(3, 6), _costs(2.0)).timeline  # F and B only
    cal = calibrate(_costs(1.0), measured)
    for got, want in zip(cal.stages, _costs(2.0).stages):
        assert (got.f, got.b) == pytest.approx((want.f, want.b))
        assert (got.i, got.w, got.forward_time(True)) == pytest.approx((want.i, want.w, want.forward_time(True)))
    # so a 1F1B trace predicts ZB-H1 on the same machine
    zb = runtime_form(zb_h1(3, 6), (), fuse=False)
    assert simulate(zb, cal).step_time == pytest.approx(simulate(zb, _costs(2.0)).step_time)


def test_the_link_latency_a_lowered_trace_waited_for_replaces_the_ping_pong() -> None:
    sched = lower(one_f_one_b(3, 6))
    profiled, real = _costs(1.0), _costs(1.0)
    real.latency = 0.3  # messages took six times the idle ping-pong
    measured = simulate(sched, real).timeline
    assert traced_latency(profiled, measured) == pytest.approx(0.3)
    cal = calibrate(profiled, measured)
    assert cal.latency == pytest.approx(0.3)
    assert simulate(sched, cal).step_time == pytest.approx(measured.step_time)
    assert simulate(sched, profiled).step_time < measured.step_time
    assert calibrate(profiled, measured, links=False).latency == 0.05
    # a trace without SEND/RECV (or whose receives never waited) keeps the profile's latency
    assert traced_latency(profiled, simulate(one_f_one_b(3, 6), real).timeline) is None


def test_the_runtime_overhead_a_lowered_trace_shows_is_modelled() -> None:
    sched = lower(one_f_one_b(3, 6))
    real = _costs(1.0)
    real.overhead = 0.1  # the executor's own time after each compute action
    measured = simulate(sched, real).timeline
    assert traced_overhead(measured) == pytest.approx(0.1)
    cal = calibrate(_costs(1.0), measured)
    assert cal.overhead == pytest.approx(0.1)
    assert simulate(sched, cal).step_time == pytest.approx(measured.step_time)
    assert simulate(sched, _costs(1.0)).step_time < measured.step_time - 0.5
    # a compute-only timeline of several ranks cannot tell overhead from waiting
    assert traced_overhead(simulate(one_f_one_b(3, 6), real).timeline) is None
    assert calibrate(_costs(1.0), simulate(one_f_one_b(3, 6), real).timeline).overhead == 0.0


@pytest.mark.parametrize("m", [2, 4, 8])
def test_overhead_is_recovered_on_two_ranks(m: int) -> None:
    """A rank whose step ends on a compute action shows one overhead fewer than it has actions."""
    sched = lower(one_f_one_b(2, m))
    real = CostModel.uniform(2, f=1.0, i=1.0, w=1.0)
    real.overhead = 0.1
    measured = simulate(sched, real).timeline
    assert traced_overhead(measured) == pytest.approx(0.1)
    assert simulate(sched, calibrate(CostModel.uniform(2), measured)).step_time == pytest.approx(measured.step_time)


def test_overhead_does_not_count_a_filled_w_twice() -> None:
    # the runtime records a wait (RECV) that ran a W inside it: the union of the intervals counts once
    ev = [Event(0, Action.parse("0F0"), 0.0, 1.0), Event(0, Action.parse("0RECV_B0"), 1.2, 4.0),
          Event(0, Action.parse("0W1"), 1.3, 2.3), Event(0, Action.parse("0I0"), 4.0, 5.0)]
    assert traced_overhead(Timeline(ev, 1)) == pytest.approx(0.2 / 2)  # 0I0 ends the span: its overhead lies outside
    assert traced_overhead(Timeline([Event(0, Action.parse("0RECV_F0"), 0.0, 1.0)], 1)) is None

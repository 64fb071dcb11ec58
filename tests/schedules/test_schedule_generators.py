"""Schedule generators: exact tables, validity over a (p, m) grid, counts, memory, bubbles, errors."""

from __future__ import annotations

from collections import Counter

import pytest

from pippy.schedules import (
    SCHEDULES,
    Kind,
    Schedule,
    forward_only,
    gpipe,
    interleaved_1f1b,
    loop_placement,
    lower,
    make_schedule,
    one_f_one_b,
    unit_time_starts,
    v_placement,
    validate,
    zb_h1,
    zb_h2,
)

PS = (1, 2, 3, 4, 8)


def table(s: Schedule) -> list[str]:
    return [" ".join(str(a) for a in acts) for acts in s.actions]


def build(name: str, p: int, m: int) -> Schedule | None:
    """The schedule, or None where the generator's documented constraint rules (p, m) out."""
    if name == "dualpipev" and m < 2 * p - 1:
        return None
    return make_schedule(name, p, m)


def step_time(s: Schedule) -> int:
    return max(row[-1] + 1 for row in unit_time_starts(s) if row)


def peak_live(s: Schedule) -> list[int]:
    """Per rank, the most (stage, mb) pairs held between F and their last backward action."""
    peaks = []
    for acts in s.actions:
        live = top = 0
        for a in acts:
            live += {Kind.F: 1, Kind.B: -1, Kind.W: -1}.get(a.kind, 0)
            top = max(top, live)
        peaks.append(top)
    return peaks


# --- exact tables (the pictures in the generators' docstrings) -------------------------------

def test_gpipe_table() -> None:
    assert table(gpipe(3, 4)) == [
        "0F0 0F1 0F2 0F3 0B3 0B2 0B1 0B0",
        "1F0 1F1 1F2 1F3 1B3 1B2 1B1 1B0",
        "2F0 2F1 2F2 2F3 2B3 2B2 2B1 2B0",
    ]


def test_1f1b_table() -> None:
    assert table(one_f_one_b(3, 4)) == [
        "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3",
        "1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3",
        "2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3",
    ]


def test_1f1b_fewer_microbatches_than_ranks() -> None:
    assert table(one_f_one_b(4, 2)) == [
        "0F0 0F1 0B0 0B1",
        "1F0 1F1 1B0 1B1",
        "2F0 2F1 2B0 2B1",
        "3F0 3B0 3F1 3B1",
    ]


def test_interleaved_1f1b_table() -> None:
    s = interleaved_1f1b(2, 4, v=2)
    assert s.stage_to_rank == (0, 1, 0, 1)
    assert table(s) == [
        "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3",
        "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3",
    ]


def test_zb_h1_table() -> None:
    assert table(zb_h1(3, 4)) == [
        "0F0 0F1 0F2 0I0 0W0 0F3 0I1 0W1 0I2 0W2 0I3 0W3",
        "1F0 1F1 1I0 1F2 1I1 1W0 1F3 1I2 1W1 1I3 1W2 1W3",
        "2F0 2I0 2F1 2I1 2F2 2I2 2W0 2F3 2I3 2W1 2W2 2W3",
    ]


def test_zb_h2_table() -> None:
    assert table(zb_h2(2, 4)) == [
        "0F0 0F1 0F2 0I0 0W0 0I1 0F3 0I2 0W1 0W2 0I3 0W3",
        "1F0 1I0 1F1 1I1 1F2 1I2 1W0 1F3 1I3 1W1 1W2 1W3",
    ]


# --- every generator over a grid of sizes ---------------------------------------------------

@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("p", PS)
def test_valid_compute_and_lowered(name: str, p: int) -> None:
    for m in sorted({1, 2, 3, p - 1, p, p + 1, 2 * p - 1, 2 * p, 2 * p + 3, 3 * p} - {0}):
        s = build(name, p, m)
        if s is None:
            continue
        validate(s)
        assert not any(a.kind.is_comm for acts in s.actions for a in acts)
        validate(lower(s))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_action_counts_per_rank(name: str) -> None:
    for p, m in [(1, 3), (2, 5), (3, 6), (4, 8), (8, 16)]:
        s = build(name, p, m)
        assert s is not None
        for r in range(p):
            stages = s.stages_of(r)
            got = Counter(a.kind for a in s.actions[r])
            n = len(stages) * m
            if s.uses_split_backward():
                assert got == Counter({Kind.F: n, Kind.I: n, Kind.W: n}), (name, p, m, r)
            else:
                assert got == Counter({Kind.F: n, Kind.B: n}), (name, p, m, r)


def test_placements() -> None:
    assert make_schedule("1f1b", 4, 4).stage_to_rank == (0, 1, 2, 3)
    assert make_schedule("interleaved_1f1b", 4, 4, v=3).stage_to_rank == loop_placement(4, 3)
    assert make_schedule("looped_bfs", 3, 4, v=2).stage_to_rank == loop_placement(3, 2)
    assert make_schedule("zbv", 3, 6).stage_to_rank == v_placement(3)
    assert make_schedule("dualpipev", 3, 6).stage_to_rank == v_placement(3)


@pytest.mark.parametrize("v", [1, 2, 3, 4])
def test_interleaved_any_microbatch_count(v: int) -> None:
    for p in (2, 3, 4, 8):
        for m in range(1, 3 * p + 2):
            validate(interleaved_1f1b(p, m, v))


def test_looped_bfs_order() -> None:
    s = make_schedule("looped_bfs", 2, 2, v=2)
    assert table(s) == [
        "0F0 0F1 2F0 2F1 2B1 2B0 0B1 0B0",
        "1F0 1F1 3F0 3F1 3B1 3B0 1B1 1B0",
    ]


# --- memory and unit-time step (structural properties, not wall-clock timings) ---------------

def test_peak_memory() -> None:
    for p in (2, 4, 8):
        for m in (p, 2 * p, 4 * p):
            assert peak_live(one_f_one_b(p, m)) == [p - r for r in range(p)]
            assert max(peak_live(zb_h1(p, m))) == p  # same peak as 1F1B
            assert max(peak_live(zb_h2(p, m))) <= 2 * p - 1
            assert max(peak_live(make_schedule("zbv", p, m))) <= 2 * p  # half-size stages: 1F1B's bytes


def test_unit_time_bubbles() -> None:
    """With every action one time unit: 1F1B idles 2(p-1), ZB-H1/H2 p-1, ZB-V/DualPipeV p-1."""
    for p in (2, 3, 4, 8):
        for m in (p, 2 * p, 3 * p):
            assert step_time(one_f_one_b(p, m)) == 2 * m + 2 * (p - 1)
            assert step_time(zb_h1(p, m)) == 3 * m + p - 1
            assert step_time(zb_h2(p, m)) == 3 * m + p - 1
            if m >= 2 * p:
                assert step_time(make_schedule("zbv", p, m)) == 6 * m + p - 1
            if m >= 2 * p - 1:
                assert step_time(make_schedule("dualpipev", p, m)) == 6 * m + p - 1


# --- forward only ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "placement", [(0,), (0, 1, 2, 3), loop_placement(3, 2), v_placement(3), v_placement(4), (0, 0, 1, 1), (1, 0, 1, 0)]
)
def test_forward_only_any_placement(placement: tuple[int, ...]) -> None:
    for m in (1, 2, 5):
        s = forward_only(placement, m)
        validate(s)
        validate(lower(s))
        assert Counter(a.kind for acts in s.actions for a in acts) == {Kind.F: len(placement) * m}


def test_forward_only_skip_deps_and_empty_rank() -> None:
    deps = {0: (), 1: (0,), 2: (0, 1), 3: (2,)}
    s = forward_only(v_placement(2), 3, deps)
    assert s.deps == deps
    validate(lower(s))
    s = forward_only((0, 2), 2)  # rank 1 holds no stage
    assert s.actions[1] == []
    validate(lower(s))


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCHEDULES))
def test_bad_sizes_raise(name: str) -> None:
    for p, m in [(0, 4), (2, 0), (-1, 3)]:
        with pytest.raises(ValueError, match=r"got .*requires .*Fix:"):
            make_schedule(name, p, m)


def test_dualpipev_needs_enough_microbatches() -> None:
    with pytest.raises(ValueError, match=r"dualpipev: got p=4, m=6, but it requires m >= 2p-1 = 7"):
        make_schedule("dualpipev", 4, 6)
    validate(make_schedule("dualpipev", 4, 7))


def test_bad_v_and_unknown_name() -> None:
    with pytest.raises(ValueError, match="v >= 1"):
        interleaved_1f1b(2, 4, v=0)
    with pytest.raises(ValueError, match="valid names: gpipe, 1f1b, interleaved_1f1b, interleaved_zb, looped_bfs, zb_h1"):
        make_schedule("pipedream", 2, 4)
    with pytest.raises(ValueError, match="does not take options"):
        make_schedule("gpipe", 2, 4, v=2)
    with pytest.raises(ValueError, match="stage_to_rank"):
        forward_only((), 2)


def test_registry_names() -> None:
    assert list(SCHEDULES) == [
        "gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "looped_bfs", "zb_h1", "zb_h2", "zbv", "dualpipev"
    ]
    for name in SCHEDULES:
        assert make_schedule(name, 2, 4).name == name
    assert make_schedule("ZB-H1", 2, 4).name == "zb_h1"


@pytest.mark.parametrize("v", [1, 2, 3])
def test_interleaved_zero_bubble_is_valid_and_beats_both_parents(v: int) -> None:
    """Interleaved ZB: valid for any m; under unit costs no slower than interleaved 1F1B nor ZB-H1, same peak as rank 0's."""
    from pippy.schedules.generators import interleaved_zb
    from pippy.sim.cost import CostModel, StageCost
    from pippy.sim.simulate import simulate

    for p in (2, 3, 4):
        for m in range(1, 3 * p + 2):
            s = interleaved_zb(p, m, v)
            validate(s)
            kinds = Counter(a.kind.name for row in s.actions for a in row)
            assert kinds == {"F": p * v * m, "I": p * v * m, "W": p * v * m}
            unit = CostModel(stages=[StageCost(f=1 / v, i=1 / v, w=1 / v, act_bytes=1.0) for _ in range(p * v)])
            zb = simulate(s, unit)
            il = simulate(interleaved_1f1b(p, m, v), unit)
            assert zb.step_time <= il.step_time + 1e-9, (p, m, v)
            assert max(zb.peak_memory) <= max(il.peak_memory) + 1e-9, (p, m, v)
            if m >= p:
                flat = CostModel(stages=[StageCost(f=1, i=1, w=1) for _ in range(p)])
                assert zb.step_time <= simulate(make_schedule("zb_h1", p, m), flat).step_time + 1e-9, (p, m, v)
    assert make_schedule("interleaved_zb", 2, 4, v=2).stage_to_rank == loop_placement(2, 2)

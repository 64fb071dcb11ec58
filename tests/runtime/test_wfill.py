"""Run-time bubble filling: which W may run early, and that filling never changes a result."""

from __future__ import annotations

import copy

import pytest
import torch
from models import MarkedMLP, mse

import pippy
from pippy import pipeline
from pippy.runtime.local import LocalPipeline
from pippy.runtime.wfill import BubbleFiller
from pippy.schedules.ir import as_actions


def test_pick_needs_budget_an_i_and_no_grad_writer_in_between() -> None:
    acts = as_actions(["1RECV_B0", "1I0", "1RECV_B1", "1I1", "2B0", "1W0", "2W9", "1B2", "1W1"])
    f = BubbleFiller(acts)
    assert f.pick(2, {(1, 0)}, 0.0) is None  # no previous step: no budget
    f.note_wait(2, 0.05, 0.0)
    assert f.pick(2, {(1, 0)}, 0.0) is None  # W cost of stage 1 unknown yet
    f.note_w(1, 0.01)
    assert f.pick(2, {(1, 0)}, 0.0) == 5  # 1W0: I ran, 1I1 / 2B0 in between do not touch stage 1's grads
    assert f.pick(2, set(), 0.0) is None  # its I has not run
    assert f.pick(2, {(1, 0)}, 0.045) is None  # 5 ms left < 10 ms W
    f.ran.add(5)
    assert f.pick(2, {(1, 0), (1, 1)}, 0.0) is None  # 1W1 sits behind 1B2, which adds into stage 1's grads
    f.start_step()
    assert f.ran == set() and f.pick(2, {(1, 0)}, 0.0) == 5  # timings kept across steps


@pytest.mark.parametrize(("cls", "ranks"), [(pippy.ScheduleZBH1, 4), (pippy.ScheduleZBH2, 4)], ids=["zb_h1", "zb_h2"])
def test_filling_is_bitwise_the_static_schedule(cls, ranks) -> None:
    """In-process, W's move on these (V schedules rarely wait here; tests/dist covers them on real ranks)."""
    torch.manual_seed(0)
    model = MarkedMLP(4, 1).double()
    x = torch.randn(16, 8, dtype=torch.float64)
    tgt = torch.randn(16, 4, dtype=torch.float64)
    runs = {}
    for fill in (False, True):
        pipe = pipeline(copy.deepcopy(model), 8, (x,))
        lp = LocalPipeline(pipe, cls, num_ranks=ranks, n_microbatches=8, loss_fn=mse, fill_bubbles=fill, trace=True)
        grads, early = [], 0
        for _ in range(4):
            lp.zero_grad()
            lp.step(x, target=tgt)
            grads.append({k: v.clone() for k, v in lp.named_grads().items() if v is not None})
            early += sum(len(ex.filler.ran) for s in lp.schedules for ex in s._executors.values())
            sched_w = [str(a) for s in lp.schedules for a in (s.schedule.actions[s.rank] if s.schedule else []) if a.kind.value == "W"]
            traced_w = [e.action for e in lp.last_timeline.events if e.action.kind.value == "W"]
            assert len(traced_w) == len(sched_w)  # every W ran exactly once
        runs[fill] = (grads, early)
    assert runs[False][1] == 0 and runs[True][1] > 0  # W's moved, and nothing changed
    for a, b in zip(runs[False][0], runs[True][0]):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_filling_happens_when_a_rank_waits() -> None:
    """In-process every wait lets the other ranks run, so from step 2 on some W runs early."""
    torch.manual_seed(0)
    x, tgt = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    pipe = pipeline(MarkedMLP(4, 1).double(), 8, (x,))
    lp = LocalPipeline(pipe, pippy.ScheduleZBH1, num_ranks=4, n_microbatches=8, loss_fn=mse)
    early = []
    for _ in range(3):
        lp.step(x, target=tgt)
        early.append(sum(len(ex.filler.ran) for s in lp.schedules for ex in s._executors.values()))
    assert early[0] == 0 and max(early[1:]) > 0

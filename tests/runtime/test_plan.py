"""The communication plan: edges in one global order, unique tags, what each stage sends and receives."""

from __future__ import annotations

import itertools

import pytest
import torch
from models import SkipNet

from pippy import pipeline
from pippy.runtime.plan import CommPlan
from pippy.schedules.generators import interleaved_1f1b, one_f_one_b
from pippy.schedules.ir import Kind, stage_comm
from pippy.schedules.lower import lower


def _skip_pipe(n_stages: int):
    x = torch.randn(4, 8, dtype=torch.float64)
    return pipeline(SkipNet(n_stages).double(), 2, (x,))


def test_skip_edge_goes_straight_to_its_consumer() -> None:
    pipe = _skip_pipe(3)  # stage 0 feeds stages 1 and 2
    sched = lower(one_f_one_b(3, 2).with_deps(pipe.deps()))
    plans = [CommPlan(pipe.stage_infos, sched, r, ordered=False) for r in range(3)]
    assert sorted(e.dst for e in plans[0].send_f[0]) == [1, 2]
    assert [e.src for e in plans[2].recv_f[2]] == [0, 1]  # edge order: producer stage first
    assert [e.dst for e in plans[0].recv_b[0]] == [1, 2]
    assert [e.src for e in plans[2].send_b[2]] == [0, 1]
    # both ends of every edge agree on its id, so on its tags
    sent = {(e.id, e.src, e.dst) for p in plans for es in p.send_f.values() for e in es}
    got = {(e.id, e.src, e.dst) for p in plans for es in p.recv_f.values() for e in es}
    assert sent == got


def test_tags_are_unique_per_edge_direction_and_microbatch() -> None:
    pipe = _skip_pipe(4)
    sched = lower(interleaved_1f1b(2, 4, v=2).with_deps(pipe.deps()))
    m = sched.n_microbatches
    plans = [CommPlan(pipe.stage_infos, sched, r, ordered=False) for r in range(2)]
    edges = {e.id: e for p in plans for es in (*p.send_f.values(), *p.recv_f.values()) for e in es}.values()
    tags = [e.tag(backward=b, mb=i, n_microbatches=m) for e in edges for b, i in itertools.product((False, True), range(m))]
    assert len(edges) >= 4 and len(tags) == len(set(tags)) == len(edges) * 2 * m


def test_same_rank_values_are_not_sent() -> None:
    pipe = _skip_pipe(4)
    sched = lower(interleaved_1f1b(2, 2, v=2).with_deps(pipe.deps()))  # stages 0, 2 on rank 0; 1, 3 on rank 1
    plan = CommPlan(pipe.stage_infos, sched, 0, ordered=False)
    assert all(pipe.stage_infos[e.dst].index % 2 == 1 for es in plan.send_f.values() for e in es)
    assert plan.readers[0] == 1 + 0  # stage 0's outputs: read by SEND_F once (stages 1 and 3 are remote)
    assert plan.readers[2] == 1  # stage 2 -> stage 3 (remote)
    assert plan.send_b_stages == {s for s in (0, 2) if Kind.SEND_B in stage_comm(sched)[s]}


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_ordered_transports_post_every_receive_once_no_later_than_its_action(rank: int) -> None:
    """On NCCL every RECV goes out where the one global order of messages puts it: never after its own action
    (which waits for it), and after every send of this rank that comes before it in that order."""
    pipe = _skip_pipe(3)
    sched = lower(one_f_one_b(3, 4).with_deps(pipe.deps()))
    plan = CommPlan(pipe.stage_infos, sched, rank, ordered=True)
    acts = sched.actions[rank]
    assert plan.prefetch_at == {}
    at = {(j, end): i for i, parts in plan.post_order.items() for j, end in parts}
    assert sorted({j for j, _ in at}) == [j for j, a in enumerate(acts) if a.kind in (Kind.RECV_F, Kind.RECV_B)]
    assert all(i <= j for (j, _), i in at.items())
    assert any(i < j for (j, _), i in at.items()) or rank == 0  # ranks 1, 2 take activations before returning grads
    if rank == 2:  # stage 2 takes stage 0's skip edge and stage 1's output: two parts, one per sender
        assert {end for j, end in at if acts[j].kind is Kind.RECV_F} == {0, 1}


def _posted_at(plan: CommPlan) -> dict[int, int]:
    """RECV action index -> the action index at whose start it is posted."""
    return {j: at for at, js in plan.prefetch_at.items() for j in js}


def test_receives_are_posted_two_ahead_per_channel_and_never_later_than_one_compute_early() -> None:
    pipe = _skip_pipe(2)
    sched = lower(one_f_one_b(2, 6).with_deps(pipe.deps()))
    for rank in (0, 1):
        acts = sched.actions[rank]
        posted = _posted_at(CommPlan(pipe.stage_infos, sched, rank, ordered=False))
        chans: dict[tuple[int, Kind], list[int]] = {}
        for idx, a in enumerate(acts):
            if a.kind not in (Kind.RECV_F, Kind.RECV_B):
                continue
            seen = chans.setdefault((a.stage, a.kind), [])
            before = [i for i in range(idx) if acts[i].kind.is_compute]
            if not before:
                assert idx not in posted  # nothing runs before it: posted at its own place
            else:
                ahead = seen[-2] if len(seen) >= 2 else 0
                assert posted[idx] == min(before[-1], ahead), (rank, str(a))
            seen.append(idx)
        # one receive of rank 1's forward channel waits while the next two are posted: 1RECV_F2 goes out at 1RECV_F0
        if rank == 1:
            f = [i for i, a in enumerate(acts) if a.kind is Kind.RECV_F]
            assert posted[f[2]] == f[0] and posted[f[1]] == 0


def test_a_channel_whose_size_varies_keeps_one_compute_action_early() -> None:
    from torch import nn

    from pippy import SplitPoint

    pipe = pipeline(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 4, (torch.ones(4, 3, 2),),
                    split_spec={"0": SplitPoint.END}, dynamic_shapes="auto")
    sched = lower(one_f_one_b(2, 4).with_deps(pipe.deps()))
    acts = sched.actions[1]
    posted = _posted_at(CommPlan(pipe.stage_infos, sched, 1, ordered=False))
    assert sum(acts[j].kind is Kind.RECV_F for j in posted) == 3  # all but the first, which nothing precedes
    for idx, a in enumerate(acts):
        if a.kind is Kind.RECV_F and idx in posted:
            assert posted[idx] == max(i for i in range(idx) if acts[i].kind.is_compute)  # needs the step's first shape

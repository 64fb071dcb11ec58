"""The in-process transport, told it is ordered, refuses what NCCL would mismatch: receives posted out of send order."""

from __future__ import annotations

import pytest
import torch

from pippy.runtime.comm import WaitContext
from pippy.runtime.localcomm import LocalTransport


def test_receives_in_send_order_pass_and_out_of_order_raise() -> None:
    a, b = LocalTransport.world(2)
    a.ordered = b.ordered = True
    a.isend(torch.ones(1), 1, tag=7)
    a.isend(torch.ones(2), 1, tag=9)
    b.irecv(torch.empty(1), 0, tag=7)  # receive 0 pairs with send 0: same tag
    with pytest.raises(RuntimeError, match=r"rank 1, stage 2, action 2RECV_B0 \(micro-batch 0\), peer rank 0: grad: "
                                           r"message 1 from rank 0 to rank 1 was sent with tag 9 but received with "
                                           r"tag 11; a transport that matches in posting order \(NCCL\)"):
        b.irecv(torch.empty(2), 0, tag=11, ctx=WaitContext(1, 2, "RECV_B", 0, 0, "grad"))
    a.reset()  # a failed step starts both logs over
    b.irecv(torch.empty(1), 0, tag=3)  # a receive posted before its send is checked when the send comes
    with pytest.raises(RuntimeError, match=r"message 0 from rank 0 to rank 1 was sent with tag 4 but received with tag 3"):
        a.isend(torch.ones(1), 1, tag=4)


def test_unordered_transports_match_by_tag_only() -> None:
    a, b = LocalTransport.world(2)
    a.isend(torch.ones(1), 1, tag=7)
    a.isend(torch.full((1,), 2.0), 1, tag=9)
    got = torch.empty(1)
    b.irecv(got, 0, tag=9)
    assert got.item() == 2.0


SCHEDULES = [("ScheduleGPipe", 1), ("Schedule1F1B", 1), ("ScheduleZBH1", 1), ("ScheduleZBH2", 1),
             ("ScheduleLoopedBFS", 2), ("ScheduleInterleaved1F1B", 2), ("ScheduleZBH1", 2), ("ScheduleZBV", 2),
             ("ScheduleDualPipeV", 2)]


@pytest.mark.parametrize(("cls_name", "per_rank"), SCHEDULES)
@pytest.mark.parametrize("ranks", [2, 4])
def test_every_schedule_posts_in_the_order_its_peers_receive(cls_name: str, per_rank: int, ranks: int) -> None:
    """On an ordered transport every rank's k-th send to a peer is that peer's k-th receive from it (static and
    varying shapes, several edges between two ranks in V placements), and the step stays transparent."""
    from models import MLPStack, check_mse_step, mse

    import pippy
    from pippy import SplitPoint, pipeline
    from pippy.runtime.local import LocalPipeline

    n = ranks * per_rank
    for dyn in (None, "auto"):
        torch.manual_seed(0)
        model = MLPStack(n=n, d=8).double()
        pipe = pipeline(model, 8, (torch.randn(16, 3, 8, dtype=torch.float64),),
                        split_spec={f"blocks.{i}": SplitPoint.END for i in range(n - 1)}, dynamic_shapes=dyn)
        cls = getattr(pippy, cls_name)
        try:
            lp = LocalPipeline(pipe, cls, num_ranks=ranks, n_microbatches=8, loss_fn=mse)
        except ValueError:  # e.g. DualPipeV's m >= 2p - 1
            continue
        for t in lp.transports:
            t.ordered = True
        for b, s in ((16, 3), (32, 5)) if dyn else ((16, 3), (16, 3)):
            check_mse_step(lp, model, torch.randn(b, s, 8, dtype=torch.float64), torch.randn(b, s, 4, dtype=torch.float64))


@pytest.mark.parametrize(("name", "config", "device", "want"), [
    ("undefined", "cpu:gloo", "cpu", "gloo"),  # init_process_group() with no backend, CPU-only torch
    ("undefined", "cpu:gloo,cuda:nccl", "cpu", "gloo"),
    ("undefined", "cpu:gloo,cuda:nccl", "cuda:1", "nccl"),
    ("gloo", "cpu:gloo,cuda:gloo", "cuda", "gloo"),
    ("nccl", "cuda:nccl", "cpu", "nccl"),  # no CPU entry: the group's one backend
    ("custom", "not a config", "cpu", "custom"),
])
def test_backend_name_reads_the_backend_of_the_stage_device(monkeypatch, name, config, device, want) -> None:
    import torch.distributed as dist

    from pippy.runtime.comm import backend_name

    monkeypatch.setattr(dist, "get_backend", lambda group=None: name)
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: config)
    assert backend_name(None, device) == want


@pytest.mark.parametrize(("model_name", "cls_name", "ranks"), [
    ("skip", "Schedule1F1B", 4), ("skip", "ScheduleGPipe", 4), ("skip", "ScheduleInterleaved1F1B", 2),
    ("skip", "ScheduleZBV", 2), ("skip", "ScheduleZBH1", 4),
    ("tied", "Schedule1F1B", 4), ("tied", "ScheduleZBV", 2), ("tied", "ScheduleDualPipeV", 2),
])
def test_skip_edges_and_tied_weights_post_in_one_global_order(model_name: str, cls_name: str, ranks: int) -> None:
    """A skip edge makes one RECV take messages from two ranks; tied weights add their gradient exchange after the
    step. The ordered in-process transport checks that no two ranks' posting orders cross (what a large NCCL send
    would deadlock on), and the step stays transparent."""
    from models import SharedEnds, SkipNet, check_mse_step, mse

    import pippy
    from pippy import pipeline
    from pippy.runtime.local import LocalPipeline

    torch.manual_seed(0)
    model = (SkipNet(4) if model_name == "skip" else SharedEnds()).double()
    d_in, d_out = (8, 3) if model_name == "skip" else (4, 4)
    pipe = pipeline(model, 4, (torch.randn(8, d_in, dtype=torch.float64),))
    lp = LocalPipeline(pipe, getattr(pippy, cls_name), num_ranks=ranks, n_microbatches=4,
                       loss_fn=mse)
    for t in lp.transports:
        t.ordered = True
    for _ in range(2):
        check_mse_step(lp, model, torch.randn(8, d_in, dtype=torch.float64), torch.randn(8, d_out, dtype=torch.float64))


def test_receives_with_the_same_peer_and_tag_take_messages_in_posting_order() -> None:
    """Two receives posted ahead for one peer and tag get the first and second message, whichever is polled first."""
    a, b = LocalTransport.world(2)
    first, second = torch.empty(1), torch.empty(1)
    h1, h2 = b.irecv(first, 0, tag=5), b.irecv(second, 0, tag=5)
    a.isend(torch.full((1,), 1.0), 1, tag=5)
    assert not b.done(h2) and b.done(h1)  # polling the later receive fills the earlier one first
    a.isend(torch.full((1,), 2.0), 1, tag=5)
    assert b.done(h2) and (first.item(), second.item()) == (1.0, 2.0)

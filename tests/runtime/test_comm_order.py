"""The in-process transport, told it is ordered, refuses what NCCL would mismatch: receives posted out of send order."""

from __future__ import annotations

import pytest
import torch

from pippy.runtime.comm import LocalTransport, WaitContext


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

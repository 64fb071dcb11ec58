"""Start-of-run agreement cases run inside spawned ranks: model code and schedules that differ between ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import pippy
from pippy import SplitPoint, pipeline
from pippy.frontend.materialize import materialize_stage


class Net(nn.Module):
    """Two linears; ``odd`` changes only the second stage's code (tanh and a factor 2), not its parameters."""

    def __init__(self, odd: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)
        self.odd = odd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)) + torch.ones(8, device=self.a.weight.device)  # a device literal in the code
        return torch.tanh(self.b(h)) * 2 if self.odd else torch.relu(self.b(h))


def _step(rank: int, model: nn.Module, schedule: type = pippy.Schedule1F1B, meta: bool = False) -> tuple[str, str]:
    pipe = pipeline(model, 2, (torch.ones(4, 8),), split_spec={"b": SplitPoint.BEGINNING})
    stage = pipe.build_stage(rank, "cpu")
    if meta:
        materialize_stage(stage, model=model)
    sched = schedule(stage, 2, loss_fn=nn.functional.mse_loss)
    torch.manual_seed(1)
    x, y = torch.randn(4, 8), torch.randn(4, 4)
    try:
        sched.step(x if rank == 0 else None, target=y if rank == 1 else None)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


def agreement_cases(rank: int, world: int) -> dict[str, Any]:
    """Same code traced on different devices (runs); different code; different schedule classes (both refused)."""
    torch.manual_seed(0)
    out: dict[str, Any] = {}
    if rank == 1:
        with torch.device("meta"):
            model = Net()
    else:
        model = Net()
    out["devices"] = _step(rank, model, meta=rank == 1)
    out["code"] = _step(rank, Net(odd=rank == 1))
    out["schedule"] = _step(rank, Net(), pippy.Schedule1F1B if rank == 0 else pippy.ScheduleGPipe)
    return out

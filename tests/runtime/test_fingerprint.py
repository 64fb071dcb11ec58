"""Stage fingerprints: equal for one model traced on another device, different for different model code."""

from __future__ import annotations

import torch
from models import gpt2

from pippy import SplitPoint, pipeline
from pippy.runtime.fingerprint import stage_fingerprints


def _pipe(device: str) -> object:
    torch.manual_seed(0)
    with torch.device(device):
        model = gpt2().eval()
    ids = torch.randint(0, 96, (2, 16), device=device)
    return pipeline(model, 2, (ids,), split_spec={"transformer.h.1": SplitPoint.BEGINNING})


def test_a_meta_trace_and_a_cpu_trace_of_one_model_agree() -> None:
    """The meta trace keeps a ``contiguous`` the CPU trace drops: layout-only operators do not count."""
    assert stage_fingerprints(_pipe("meta")) == stage_fingerprints(_pipe("cpu"))


def test_different_code_with_the_same_parameters_differs() -> None:
    def net(act: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(4, 4), act, torch.nn.Linear(4, 2))

    x = torch.ones(2, 4)
    relu = pipeline(net(torch.nn.ReLU()), 1, (x,), split_spec={"1": SplitPoint.END})
    tanh = pipeline(net(torch.nn.Tanh()), 1, (x,), split_spec={"1": SplitPoint.END})
    a, b = stage_fingerprints(relu), stage_fingerprints(tanh)
    assert a[0] != b[0] and a[1] == b[1]  # the first differing stage is named

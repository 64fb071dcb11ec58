"""Doctests in ``pippy/`` that open a one-rank process group close it; one that fails before it does must not leave
it open for the next (which would then fail to open its own, hiding the first failure among many)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _close_doctest_process_group(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if type(request.node).__name__ != "DoctestItem":
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

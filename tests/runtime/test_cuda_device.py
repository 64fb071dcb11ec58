"""CUDA stages (no GPU needed: torch.cuda is patched): a bare 'cuda' is indexed, the device is made current,
NCCL collectives run on this process's device, and a gloo-only group is refused for CUDA stages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.distributed as dist

from pippy import pipeline
from pippy.frontend import cudadevice, policies
from pippy.runtime import guards
from pippy.runtime.guards import check_device
from pippy.runtime.stage import StageError


class FakeCuda:
    """Four CUDA devices, current device ``current``; records set_device and device() calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, current: int = 0) -> None:
        self.current, self.set_to, self.entered = current, [], []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", self._set)
        monkeypatch.setattr(torch.cuda, "device", self._device)

    def _set(self, dev: Any) -> None:
        self.current = torch.device(dev).index
        self.set_to.append(torch.device(dev))

    @contextmanager
    def _device(self, dev: Any) -> Iterator[None]:
        self.entered.append(torch.device(dev))
        yield


@pytest.fixture
def pipe() -> Any:
    return pipeline(torch.nn.Linear(2, 1), 1, (torch.ones(1, 2),))


@pytest.fixture
def gloo() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_bare_cuda_is_indexed_by_local_rank_and_made_current(monkeypatch: pytest.MonkeyPatch, pipe: Any) -> None:
    fake = FakeCuda(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert check_device(pipe, 0, "cuda") == torch.device("cuda", 2)
    assert fake.set_to == [torch.device("cuda", 2)]


def test_an_indexed_cuda_stage_becomes_the_current_device_once(monkeypatch: pytest.MonkeyPatch, pipe: Any) -> None:
    fake = FakeCuda(monkeypatch)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert check_device(pipe, 0, torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert check_device(pipe, 0, "cuda") == torch.device("cuda", 3)  # a bare 'cuda' now means the current one
    assert fake.set_to == [torch.device("cuda", 3)]


def test_a_gloo_group_is_refused_for_cuda_stages_naming_nccl(monkeypatch: pytest.MonkeyPatch, pipe: Any,
                                                              gloo: None) -> None:
    fake = FakeCuda(monkeypatch)
    with pytest.raises(StageError, match=r"build_stage\(0, 'cuda:1'\) on rank 0: .*gloo.*backend='nccl'.*"
                                         r"cpu:gloo,cuda:nccl"):
        check_device(pipe, 0, "cuda:1")
    assert fake.set_to == []
    monkeypatch.setattr(guards, "backend_name", lambda group=None, device=None: "nccl")  # e.g. cpu:gloo,cuda:nccl
    assert check_device(pipe, 0, "cuda:1") == torch.device("cuda", 1)


def test_nccl_barriers_and_object_collectives_use_this_process_device(monkeypatch: pytest.MonkeyPatch,
                                                                      gloo: None) -> None:
    fake = FakeCuda(monkeypatch, current=0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(dist, "barrier", lambda group=None, **kw: calls.append(("barrier", kw.get("device_ids"))))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "broadcast_object_list",
                        lambda box, src=0, group=None, device=None: calls.append(("broadcast", device)))
    cudadevice.barrier()
    with cudadevice.on_collective_device():
        pass
    policies._shared(lambda: "cut", deterministic=False)
    assert calls == [("barrier", [1]), ("broadcast", torch.device("cuda", 1))]
    assert fake.entered == [torch.device("cuda", 1)]


def test_gloo_collectives_stay_on_the_cpu(monkeypatch: pytest.MonkeyPatch, gloo: None) -> None:
    fake = FakeCuda(monkeypatch)
    assert cudadevice.collective_device() is None
    cudadevice.barrier()  # a real gloo barrier, world of one
    assert fake.entered == []


def test_generation_stages_check_and_resolve_their_cuda_device_too() -> None:
    transformers = pytest.importorskip("transformers")
    from pippy import pipeline_for_generation

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50,
                                                                n_positions=32))
    gen = pipeline_for_generation(gpt2, 2)
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    with pytest.raises(StageError, match=r"GenerationPipe.build_stage\(1, 'cuda'\): this machine has no CUDA device"):
        gen.build_stage(1, "cuda")

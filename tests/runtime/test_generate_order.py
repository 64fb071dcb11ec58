"""Pipelined generation posts its messages in one global order (what NCCL needs), with any number of groups in flight.

The in-process transport is told it is ordered: it then raises when the k-th receive between two
ranks is not the k-th send, or when two ranks' posting orders cross (a large NCCL send finishes
only when its receive runs, so crossing orders would wait forever).
"""

from __future__ import annotations

import pytest
import torch
from gen_cases import (
    NEW,
    PROMPT,
    build,
    early_eos,
    hf,
    one_thread,  # noqa: F401 - the fixture pytestmark uses
    prompts,
)

from pippy import generate, pipeline_for_generation
from pippy.runtime.localcomm import LocalTransport

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ordered(monkeypatch: pytest.MonkeyPatch) -> list[LocalTransport]:
    """Every in-process world made from now on is ordered; returns the transports made, to check they were used."""
    made: list[LocalTransport] = []
    world = LocalTransport.world.__func__  # type: ignore[attr-defined]

    def ordered_world(cls: type[LocalTransport], n: int, timeout: float | None = None) -> list[LocalTransport]:
        transports = world(cls, n, timeout)
        for t in transports:
            t.ordered = True
        made.extend(transports)
        return transports

    monkeypatch.setattr(LocalTransport, "world", classmethod(ordered_world))
    return made


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("ranks", [2, 3])
def test_groups_in_flight_post_in_one_global_order(ordered: list[LocalTransport], ranks: int, sample: bool) -> None:
    """Groups 1, 2, 3 (and 3 with 2 in flight) on 2 and 3 ranks: left-padded prompts, an EOS that ends one group (and
    other rows) early, so groups run for different numbers of token steps; the tokens are ``model.generate``'s."""
    kind, seed = ("llama", 11) if sample else ("gpt2", None)
    ids, mask = prompts()
    eos = early_eos(kind, 2, seed)
    model = build(kind, list(eos))
    ref = hf(model, ids, mask, seed)
    assert torch.isin(ref[:, PROMPT:], torch.tensor(eos)).any(dim=1).sum() >= 2  # EOS really ended rows early
    pipe = pipeline_for_generation(model, ranks, max_length=PROMPT + NEW)
    stages = [pipe.build_stage(r) for r in range(ranks)]
    for groups, in_flight in ((1, None), (2, None), (3, None), (3, 2)):
        out = generate(stages, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=sample, seed=seed,
                       groups=groups, in_flight=in_flight, progress=0)
        assert torch.equal(out, ref), (ranks, groups, in_flight, out, ref)
    assert len(ordered) == 4 * ranks and all(t.ordered for t in ordered)


def test_all_groups_stop_at_once_and_more_groups_than_ranks(ordered: list[LocalTransport]) -> None:
    """Every row stops at its first or second new token (the ring empties while receives are posted ahead), and six
    groups of one row go round two ranks."""
    ids, mask = prompts()
    plain = hf(build("llama"), ids, mask)[:, PROMPT:]
    model = build("llama", sorted({int(v) for v in plain[:, 1]}))
    ref = hf(model, ids, mask)
    assert ref.shape[1] < PROMPT + NEW
    pipe = pipeline_for_generation(model, 2, max_length=PROMPT + NEW)
    stages = [pipe.build_stage(r) for r in range(2)]
    for groups in (3, 6):
        out = generate(stages, ids, attention_mask=mask, max_new_tokens=NEW, groups=groups, progress=0)
        assert torch.equal(out, ref), groups
    assert ordered and all(t.ordered for t in ordered)


def test_the_in_process_run_is_ordered_by_itself() -> None:
    """Without the test's help, ``generate`` on all stages in one process checks the order on 2+ stages."""
    made: list[LocalTransport] = []
    world = LocalTransport.world

    def watch(n: int, timeout: float | None = None) -> list[LocalTransport]:
        made.extend(world(n, timeout))
        return made[-n:]

    model = build("gpt2")
    ids, mask = prompts()
    pipe = pipeline_for_generation(model, 2, max_length=PROMPT + NEW)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalTransport, "world", watch)
        out = generate([pipe.build_stage(r) for r in range(2)], ids, attention_mask=mask, max_new_tokens=NEW,
                       groups=3, progress=0)
    assert torch.equal(out, hf(model, ids, mask))
    assert len(made) == 2 and all(t.ordered for t in made)

"""Variable shapes: one trace, then steps with other sequence lengths and batch sizes, transparent (float64)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
import transformers as tf
from models import MLPStack, check_mse_step, mse
from torch import nn

import pippy
from pippy import Schedule1F1B, ScheduleInterleaved1F1B, ScheduleZBV, SplitPoint, pipe_split, pipeline
from pippy.frontend.trace import trace_count
from pippy.runtime.local import LocalPipeline
from pippy.runtime.localcomm import LocalTransport
from pippy.runtime.shapes import HEADER_TAG

LENGTHS = (64, 128, 96, 17)


def _hf(name: str) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = tf.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=96, n_positions=256)
        return tf.GPT2LMHeadModel(cfg), "transformer.h"
    if name == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=96)
        return tf.LlamaForCausalLM(cfg), "model.layers"
    cfg = tf.BertConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=96)
    return tf.BertForMaskedLM(cfg), "bert.encoder.layer"


def _lm_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out["logits"].flatten(0, 1), y.flatten())


def _batch(b: int, n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, : n // 3] = 0  # a left-padded row
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 96, (b, n), generator=g)


def _check_steps(lp: LocalPipeline, model: nn.Module, shapes: list[tuple[int, int]], what: str) -> None:
    for k, (b, n) in enumerate(shapes):
        kw, y = _batch(b, n, seed=k)
        lp.zero_grad()
        model.zero_grad(set_to_none=True)
        out = lp.step(**kw, target=y)
        ref = model(**kw)
        _lm_loss(ref, y).backward()
        torch.testing.assert_close(out["logits"], ref.logits, rtol=0, atol=1e-12, msg=f"{what} {b}x{n}")
        grads = lp.named_grads()
        for name, p in model.named_parameters():
            if name in grads and p.grad is not None:
                torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=f"{what} {b}x{n} {name}")
        assert sum(g is not None for g in grads.values()) >= len(grads) - 2, what  # every block took part


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_sequence_length_varies_without_retrace(name: str) -> None:
    model, blocks = _hf(name)
    model = model.double().eval()  # eval: no dropout, so the plain model is the reference
    kw, _ = _batch(4, 64, seed=0)
    cases = [(2, [Schedule1F1B]), (4, [ScheduleInterleaved1F1B, ScheduleZBV])]
    for n_stages, schedules in cases:
        spec = {f"{blocks}.{i}": SplitPoint.END for i in range(n_stages - 1)}
        pipe = pipeline(model, 2, (), kw, split_spec=spec, dynamic_shapes="auto")
        traced = trace_count()
        for cls in schedules:
            lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=2, loss_fn=_lm_loss, loss_reduction="mean")
            _check_steps(lp, model, [(4, n) for n in LENGTHS], f"{name} {cls.__name__}")
        assert trace_count() == traced, f"{name}: a step traced the model again"


def test_batch_size_varies_and_ranges_are_per_microbatch() -> None:
    model, _ = _hf("gpt2")
    model = model.double().eval()
    kw, _ = _batch(4, 64, seed=0)
    pipe = pipeline(model, 2, (), kw, split_spec={"transformer.h.1": SplitPoint.END},
                    dynamic_shapes={"input_ids": {0: (2, 8), 1: (2, 200)}})
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=_lm_loss, loss_reduction="mean")
    _check_steps(lp, model, [(4, 64), (6, 100), (16, 33), (4, 200)], "gpt2 batch")
    kw, y = _batch(18, 16, seed=1)  # 9 rows per micro-batch: above the declared 8
    with pytest.raises(ValueError, match=r"micro-batch 0 of 2: .*input_ids.*dimension 0 is 9, outside the range 2\.\.8"):
        lp.step(**kw, target=y)
    kw, y = _batch(4, 201, seed=1)
    with pytest.raises(ValueError, match=r"rank 0, stage 0.*dimension 1 is 201, outside the range 2\.\.200"):
        lp.step(**kw, target=y)
    kw, y = _batch(4, 1, seed=1)
    with pytest.raises(ValueError, match=r"dimension 1 is 1, outside the range 2\.\.200.*specializes"):
        lp.step(**kw, target=y)
    kw, y = _batch(4, 32, seed=1)
    kw["attention_mask"] = kw["attention_mask"][:, :31]
    with pytest.raises(ValueError, match=r"attention_mask.*dimension 1 is 31, but .*input_ids.* is 32"):
        lp.step(**kw, target=y)


class _SizeScaled(nn.Module):
    """Stage 1 uses the sequence length, which its only input (summed over the sequence) no longer has."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).sum(1)  # [b, 4]: the length is gone
        n = x.shape[1]
        pipe_split()
        return self.b(h) / n


def test_a_size_that_no_tensor_carries_is_sent() -> None:
    torch.manual_seed(0)
    model = _SizeScaled().double()
    x = torch.randn(4, 6, 4, dtype=torch.float64)
    pipe = pipeline(model, 2, (x,), dynamic_shapes="auto")
    varying = [m for m in pipe.stage_infos[1].input_meta if m.varies]
    assert len(varying) == 1 and varying[0].const == 6  # the length, as a number
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=mse)
    for n in (6, 11, 3):
        check_mse_step(lp, model, torch.randn(4, n, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))


def _count_headers(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    seen: Counter[str] = Counter()
    send = LocalTransport.isend

    def counting(self: LocalTransport, tensor: torch.Tensor, peer: int, tag: int, ctx: Any = None) -> Any:
        seen["header" if HEADER_TAG <= tag < 2 * HEADER_TAG else "payload" if tag < HEADER_TAG else "other"] += 1
        return send(self, tensor, peer, tag, ctx)

    monkeypatch.setattr(LocalTransport, "isend", counting)
    return seen


def test_static_pipes_send_no_header_and_dynamic_ones_one_per_varying_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _hf("gpt2")
    model = model.double().eval()
    kw, y = _batch(4, 16, seed=0)
    seen = _count_headers(monkeypatch)
    for dyn in (None, "auto"):
        pipe = pipeline(model, 2, (), kw, split_spec={"transformer.h.1": SplitPoint.END}, dynamic_shapes=dyn)
        lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=_lm_loss, loss_reduction="mean")
        seen.clear()
        lp.step(**kw, target=y)
        edges = sum(len(c) for c in pipe.stage_infos[0].consumers)
        grads = 2 * sum(m.requires_grad for m in pipe.stage_infos[1].input_meta)
        assert seen["payload"] == 2 * edges + grads, (dyn, seen)
        # each gradient goes with its flag (whether it exists) in the header band: static pipes send only those
        assert seen["header"] == (0 if dyn is None else 2 * edges) + grads, (dyn, seen)


SCHEDULES = [("ScheduleGPipe", 1), ("Schedule1F1B", 1), ("ScheduleZBH1", 1), ("ScheduleZBH2", 1),
             ("ScheduleLoopedBFS", 2), ("ScheduleInterleaved1F1B", 2), ("ScheduleZBH1", 2), ("ScheduleZBV", 2),
             ("ScheduleDualPipeV", 2)]


@pytest.mark.parametrize(("cls_name", "per_rank"), SCHEDULES)
def test_every_schedule_steps_and_evaluates_other_shapes(cls_name: str, per_rank: int) -> None:
    torch.manual_seed(0)
    model = MLPStack(n=4, d=8).double()
    n_stages = 2 * per_rank
    spec = {f"blocks.{4 // n_stages * (i + 1) - 1}": SplitPoint.END for i in range(n_stages - 1)}
    pipe = pipeline(model, 4, (torch.randn(8, 5, 8, dtype=torch.float64),), split_spec=spec, dynamic_shapes="auto")
    lp = LocalPipeline(pipe, getattr(pippy, cls_name), num_ranks=2, n_microbatches=4, loss_fn=mse)
    for b, n in ((8, 5), (12, 9), (16, 3)):
        x = torch.randn(b, n, 8, dtype=torch.float64)
        check_mse_step(lp, model, x, torch.randn(b, n, 4, dtype=torch.float64))
        torch.testing.assert_close(lp.eval(x), model(x), rtol=0, atol=1e-13)


@pytest.mark.parametrize("cls_name", ["Schedule1F1B", "ScheduleDualPipeV", "ScheduleZBV"])
def test_ordered_transports_receive_varying_shapes_in_edge_order(cls_name: str, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """NCCL matches messages by posting order: every receive of an action with a varying size is then posted where
    the order of messages puts it, in edge order (the in-process transport is told it is ordered: it then also checks
    that between two ranks the k-th receive posted is for the k-th message sent, and that no two ranks' orders
    cross)."""
    from pippy.runtime import shapes

    lazy: list[bool] = []
    made = shapes.Incoming.__init__

    def spy(self: Any, *args: Any, post: bool = True, **kw: Any) -> None:
        lazy.append(not post)
        made(self, *args, post=post, **kw)

    monkeypatch.setattr(shapes.Incoming, "__init__", spy)
    torch.manual_seed(0)
    model = MLPStack(n=4, d=8).double()
    per_rank = 1 if cls_name == "Schedule1F1B" else 2
    spec = {f"blocks.{4 // (2 * per_rank) * (i + 1) - 1}": SplitPoint.END for i in range(2 * per_rank - 1)}
    pipe = pipeline(model, 4, (torch.randn(8, 5, 8, dtype=torch.float64),), split_spec=spec, dynamic_shapes="auto")
    lp = LocalPipeline(pipe, getattr(pippy, cls_name), num_ranks=2, n_microbatches=4, loss_fn=mse)
    for t in lp.transports:
        t.ordered = True
    for b, n in ((8, 5), (12, 7)):
        check_mse_step(lp, model, torch.randn(b, n, 8, dtype=torch.float64), torch.randn(b, n, 4, dtype=torch.float64))
    # every receive goes out where the order of messages puts it (postorder), opened there: header, then tensor
    assert all(ex.plan.post_order for sch in lp.schedules for ex in sch._executors.values())
    assert lazy and all(lazy)  # and none at its making (Receives.open posts them, in edge order)


def test_later_microbatches_post_their_tensor_beside_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's micro-batches share their shapes: after the first header of a step, a receive goes out whole at once
    (no round trip through the header), and the next step, with other sizes, starts over."""
    from pippy.runtime import shapes

    made: list[tuple[int, int, tuple[int, ...] | None]] = []
    init = shapes.Incoming.__init__

    def spy(self: Any, *args: Any, **kw: Any) -> None:
        init(self, *args, **kw)
        made.append((self.ctx.stage, self.ctx.mb, self.expect))

    monkeypatch.setattr(shapes.Incoming, "__init__", spy)
    torch.manual_seed(0)
    model = MLPStack(n=4, d=8).double()
    pipe = pipeline(model, 4, (torch.randn(8, 5, 8, dtype=torch.float64),), split_spec={"blocks.1": SplitPoint.END},
                    dynamic_shapes="auto")
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=mse)
    for b, n in ((8, 5), (12, 9)):
        made.clear()
        check_mse_step(lp, model, torch.randn(b, n, 8, dtype=torch.float64), torch.randn(b, n, 4, dtype=torch.float64))
        per_mb: dict[int, list[tuple[int, ...] | None]] = {}
        for _, mb, e in made:
            per_mb.setdefault(mb, []).append(e)
        assert sorted(per_mb) == [0, 1, 2, 3], made
        assert all(e is None for e in per_mb[0]), made  # the first of the step waits for its header
        assert all(e is not None and e[0] == b // 4 and n in e for mb in (1, 2, 3) for e in per_mb[mb]), made


def test_unequal_microbatch_shapes_are_refused_before_anything_is_posted() -> None:
    from pippy.frontend.split import ValueMeta
    from pippy.runtime.comm import WaitContext
    from pippy.runtime.plan import CommPlan
    from pippy.runtime.receives import Receives
    from pippy.runtime.shapes import Incoming, send_value
    from pippy.runtime.stage import Stage, StageError
    from pippy.schedules.generators import one_f_one_b
    from pippy.schedules.lower import lower

    pipe = pipeline(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 2, (torch.ones(2, 3, 2),),
                    split_spec={"0": SplitPoint.END}, dynamic_shapes="auto")
    ends = LocalTransport.world(2)
    rx = Receives(ends[0], CommPlan(pipe.stage_infos, lower(one_f_one_b(2, 2)), 0, ordered=False), pipe.stage_infos,
                  {0: Stage(pipe, 0)})
    meta = pipe.stage_infos[0].outputs[0]
    assert meta.dynamic and not meta.per_mb
    rx.note_output("rank 0, stage 0, micro-batch 0, action 0F0", 0, 0, meta, (1, 3, 2))
    with pytest.raises(StageError, match=r"rank 0, stage 0, micro-batch 1, action 0F1: output 0 has shape \[1, 4, 2\], "
                                         r"but an earlier micro-batch of this step gave \[1, 3, 2\].*equal micro-batches"):
        rx.note_output("rank 0, stage 0, micro-batch 1, action 0F1", 0, 0, meta, (1, 4, 2))
    rx.start_step()
    rx.note_output("rank 0, stage 0, micro-batch 0, action 0F0", 0, 0, meta, (1, 4, 2))  # a new step: new sizes
    # a receiver told to expect one shape refuses a header announcing another, before waiting for the tensor
    vm = ValueMeta((2, 8), torch.float32, dynamic=(1,))
    send_value(ends[0], torch.ones(2, 5), vm, peer=1, tag=3)
    ctx = WaitContext(1, 1, "RECV_F", 1, 0, "input 0")
    inc = Incoming(ends[1], vm, peer=0, tag=3, ctx=ctx, device=torch.device("cpu"), expect=(2, 5))
    assert inc.payload is not None
    for _ in inc.wait():
        pass
    assert inc.value.shape == (2, 5)
    send_value(ends[0], torch.ones(2, 6), vm, peer=1, tag=4)
    inc = Incoming(ends[1], vm, peer=0, tag=4, ctx=ctx, device=torch.device("cpu"), expect=(2, 6))
    bad = Incoming(ends[1], vm, peer=0, tag=5, ctx=ctx, device=torch.device("cpu"), expect=(2, 6))
    ends[0].isend(torch.tensor([2, 7]), 1, HEADER_TAG + 5)  # (a real sender refuses to send its tensor: note_output)
    with pytest.raises(StageError, match=r"announced shape \[2, 7\], but an earlier micro-batch of this step came with "
                                         r"\[2, 6\]"):
        for _ in bad.wait():
            pass
    # a size that depends on the data may differ between micro-batches: never assumed
    data_sized = ValueMeta((2, 8), torch.float32, dynamic=(1,), per_mb=True)
    assert Incoming(ends[1], data_sized, peer=0, tag=6, ctx=ctx, device=torch.device("cpu"), expect=(2, 5)).expect is None
    rx.note_output("x", 0, 0, data_sized, (9, 9))  # not checked either


class KeptTokens(nn.Module):
    """The tokens a mask keeps (a size that depends on the data) cross the split, then are scattered back."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        kept = h[keep]
        pipe_split()
        return self.head(h.masked_scatter(keep[..., None], torch.tanh(self.l2(kept))))


@pytest.mark.parametrize("cls", [pippy.Schedule1F1B, pippy.ScheduleZBH1, pippy.ScheduleGPipe])
def test_a_size_that_depends_on_the_data_crosses_a_split(cls: type) -> None:
    torch.manual_seed(0)
    model = KeptTokens().double()
    x, y = torch.randn(4, 6, 8, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)
    keep = torch.rand(4, 6) > 0.4
    keep[0] = True  # micro-batches keep different numbers of tokens
    ref = model(x, keep)
    mse(ref, y).backward()
    lp = LocalPipeline(pipeline(model, 2, (x, keep)), cls, num_ranks=2, n_microbatches=2, loss_fn=mse)
    for _ in range(2):  # and again with another mask, without tracing again
        lp.zero_grad()
        out = lp.step(x, keep, target=y)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
        grads = lp.named_grads()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-13)
        keep = torch.rand(4, 6) > 0.7
        model.zero_grad()
        ref = model(x, keep)
        mse(ref, y).backward()


class KeptRows(nn.Module):
    """The output is the rows a label mask keeps (ModernBERT's sparse prediction): its size depends on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h.reshape(-1, 8)[labels.reshape(-1) != -100])


def _sum_sq(out: torch.Tensor, target: Any) -> torch.Tensor:
    return out.pow(2).sum()


_sum_sq.reduction = "sum"  # type: ignore[attr-defined]


@pytest.mark.parametrize("n_mb", [2, 4])  # 4: one-row micro-batches, where the merge dim is looked for by growth
def test_an_output_whose_size_depends_on_the_data_is_concatenated(n_mb: int) -> None:
    torch.manual_seed(0)
    model = KeptRows().double()
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    labels = torch.randint(0, 5, (4, 6))
    labels[0, :4] = -100
    labels[2, 1] = -100
    lp = LocalPipeline(pipeline(model, n_mb, (x,), {"labels": labels}, split_spec={"a": SplitPoint.END}),
                       pippy.Schedule1F1B, num_ranks=2, n_microbatches=n_mb, loss_fn=_sum_sq)
    ref = model(x, labels)
    _sum_sq(ref, None).backward()
    torch.testing.assert_close(lp.eval(x, labels=labels), ref.detach(), rtol=0, atol=1e-14)  # one-row matmuls may round otherwise
    out = lp.step(x, labels=labels, target=torch.zeros(4))
    assert out.shape == (19, 5)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-14)
    grads = lp.named_grads()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-13)


class SeqFirst(nn.Module):
    """Token ids ``[T, B]`` in, logits ``[T, B, V]`` out: the batch is dim 1 throughout."""

    def __init__(self) -> None:
        super().__init__()
        self.e, self.a, self.h = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(self.e(ids)))
        pipe_split()
        return self.h(h)


def _token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())


_token_ce.reduction = "mean"  # type: ignore[attr-defined]


@pytest.mark.parametrize("dynamic", [None, "auto"])
def test_a_sequence_first_class_target_splits_along_the_batch(dynamic: str | None) -> None:
    torch.manual_seed(0)
    model = SeqFirst().double()
    ids, y = torch.randint(0, 11, (6, 4)), torch.randint(0, 11, (6, 4))
    pipe = pipeline(model, 2, (ids,), args_chunk_spec=(pippy.TensorChunkSpec(1),), dynamic_shapes=dynamic)
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=_token_ce)
    losses: list[torch.Tensor] = []
    lp.step(ids, target=y, losses=losses)
    want = [_token_ce(model(ids[:, k * 2:(k + 1) * 2]), y[:, k * 2:(k + 1) * 2]) for k in range(2)]
    torch.testing.assert_close(torch.stack(losses), torch.stack(want).detach(), rtol=0, atol=1e-13)
    model.zero_grad(set_to_none=True)
    _token_ce(model(ids), y).backward()
    grads = lp.named_grads()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-13)

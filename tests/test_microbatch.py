"""Micro-batch split / merge round trips over pytrees."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from pippy import PipeliningShapeError, pipe_split
from pippy.microbatch import (
    Replicate,
    Sum,
    TensorChunkSpec,
    merge_chunks,
    split_batch,
    split_value,
    uneven_split_inputs,
)


def test_split_merge_round_trip_nested() -> None:
    value = {"a": torch.arange(12).view(4, 3), "b": [torch.ones(4, 2), (torch.zeros(4), "tag")], "c": 3}
    parts = split_value(value, 2)
    assert parts[0]["a"].shape == (2, 3) and parts[1]["b"][1][1] == "tag" and parts[0]["c"] == 3
    merged = merge_chunks(parts)
    assert torch.equal(merged["a"], value["a"]) and torch.equal(merged["b"][0], value["b"][0])


def test_split_along_other_dim_and_replicate() -> None:
    x = torch.arange(24).view(2, 12)
    mbs = split_batch((x, torch.ones(3)), {"k": torch.zeros(6)}, 3, args_spec=(TensorChunkSpec(1), Replicate()))
    assert mbs[0][0][0].shape == (2, 4) and mbs[2][0][1].shape == (3,) and mbs[1][1]["k"].shape == (2,)
    assert torch.equal(merge_chunks([m[0][0] for m in mbs], TensorChunkSpec(1)), x)


def test_scalar_outputs_merge_as_mean_or_sum() -> None:
    chunks = [torch.tensor(1.0), torch.tensor(3.0)]
    assert merge_chunks(chunks).item() == 2.0
    assert merge_chunks(chunks, Sum()).item() == 4.0


@pytest.mark.parametrize(("size", "n", "msg"), [(2, 4, "smaller than the 4"), (10, 4, "multiple of 4")])
def test_bad_batch_sizes(size: int, n: int, msg: str) -> None:
    with pytest.raises(PipeliningShapeError, match=msg):  # a ValueError too, as before
        split_value(torch.zeros(size, 2), n)


def test_spec_structure_mismatch() -> None:
    with pytest.raises(ValueError, match="chunk spec"):
        split_batch((torch.zeros(4), torch.zeros(4)), {}, 2, args_spec=(TensorChunkSpec(0),))


def test_output_merge_dims_follow_the_inputs_split_dim() -> None:
    from pippy.microbatch import output_merge_dims

    seq_first = (torch.zeros(6, 2, 4),)  # one micro-batch: the batch (2) is dim 1
    spec = (TensorChunkSpec(1),)
    shapes = [(6, 2, 4), (2, 4), (6, 2), (), None, (3, 2, 2)]
    # the batch's size at the split dim -> that dim; elsewhere, 0-dim or a non-tensor -> 0
    assert output_merge_dims(seq_first, {}, spec, None, shapes) == [1, 0, 1, 0, 0, 1]
    assert output_merge_dims(seq_first, {}, None, None, shapes) == [0] * 6  # dim 0 split: always dim 0
    # [batch, classes] logits with 2 classes: dim 0 has the micro-batch's size too, so it stays the merge dim
    assert output_merge_dims(seq_first, {}, spec, None, [(2, 2)]) == [0]
    # inputs split along dims 1 and 2, an output with the micro-batch's size at both: ambiguous -> 0
    both = (torch.zeros(6, 2, 4), torch.zeros(3, 3, 2))
    assert output_merge_dims(both, {}, (TensorChunkSpec(1), TensorChunkSpec(2)), None, [(3, 2, 2)]) == [0]
    # keyword inputs count too, Replicate ones do not
    assert output_merge_dims((torch.zeros(5, 7),), {"x": torch.zeros(6, 2)}, (Replicate(),),
                             {"x": TensorChunkSpec(1)}, [(6, 2), (5, 7)]) == [1, 0]


def test_a_sequence_as_long_as_a_micro_batch_still_merges_along_the_batch() -> None:
    """``[seq, batch, width]`` with seq == the micro-batch size: dim 0 and dim 1 both have its size, so the pipe
    traces again with symbolic sizes to tell them apart; outputs, targets and grads then follow dim 1."""
    import copy

    from pippy import Schedule1F1B, SplitPoint, TensorChunkSpec, pipeline
    from pippy.runtime.local import LocalPipeline

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(2, 8, 4, dtype=torch.float64), torch.randn(2, 8, 3, dtype=torch.float64)
    pipe = pipeline(copy.deepcopy(model), 4, (x,), split_spec={"1": SplitPoint.END}, args_chunk_spec=(TensorChunkSpec(1),))
    assert pipe.output_merge_dims == [1]
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=torch.nn.functional.mse_loss)
    out = lp.step(x, target=y)
    ref = copy.deepcopy(model)
    torch.nn.functional.mse_loss(ref(x), y).backward()
    assert out.shape == (2, 8, 3) and torch.allclose(out, ref(x), atol=1e-12)
    for n, p in ref.named_parameters():
        assert torch.allclose(lp.named_grads()[n], p.grad, atol=1e-12), n


class _Moved(torch.nn.Module):
    """Returns its batch at dim 1: ``h.T`` for 2-d inputs, ``h.permute(1, 0, 2)`` for 3-d ones."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.b(torch.tanh(self.a(x)))
        return (h.T if h.dim() == 2 else h.permute(1, 0, 2)), h


@pytest.mark.parametrize("shape,width,dynamic", [
    ((8, 4), 3, False), ((8, 5, 4), 3, False), ((8, 5, 4), 2, False),  # width 2 == the micro-batch size: symbols
    ((8, 5, 4), 3, True),
])
def test_an_output_whose_batch_moved_merges_along_it(shape: tuple[int, ...], width: int, dynamic: bool) -> None:
    """``h.T`` / ``h.permute(1, 0, 2)`` carry the batch at dim 1: outputs merge there, a target shaped like them
    splits there, and grads equal the plain model's (float64); a width equal to the micro-batch size (``[5, 2, 2]``)
    is settled by symbols."""
    import copy

    from pippy import ScheduleGPipe, SplitPoint, pipeline
    from pippy.runtime.local import LocalPipeline

    torch.manual_seed(0)
    model = _Moved(width).double()
    x = torch.randn(*shape, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = pipeline(copy.deepcopy(model), 4, (x,), split_spec={"a": SplitPoint.END},
                        dynamic_shapes="auto" if dynamic else None)
    assert pipe.output_merge_dims == [1, 0]

    def loss_fn(out: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(out[0], target) + out[1].pow(2).mean()

    lp = LocalPipeline(pipe, ScheduleGPipe, num_ranks=2, n_microbatches=4, loss_fn=loss_fn)
    batches = [x, torch.randn(12, 7, 4, dtype=torch.float64)] if dynamic else [x]  # other sizes: no new trace
    for xb in batches:
        ref_out = model(xb)
        y = torch.randn_like(ref_out[0])
        out = lp.step(xb, target=y)
        model.zero_grad()
        loss_fn(ref_out, y).backward()
        for got, want in zip(out, ref_out):
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12)
        for n, p in model.named_parameters():
            assert torch.allclose(lp.named_grads()[n], p.grad, atol=1e-12), n
        lp.zero_grad()


def test_a_width_equal_to_the_micro_batch_still_merges_along_dim_0() -> None:
    """``[batch, width]`` with width == the micro-batch size looks like a moved batch in plain numbers; the symbols
    say dim 0, and a flattened ``[batch * seq, width]`` output stays at dim 0 too."""
    from pippy import SplitPoint, pipeline

    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2), torch.nn.Flatten(0, 1))
    pipe = pipeline(net, 4, (torch.randn(8, 5, 4),), split_spec={"1": SplitPoint.END})
    assert pipe.output_merge_dims is None
    pipe = pipeline(net[:3], 4, (torch.randn(8, 4),), split_spec={"1": SplitPoint.END})
    assert pipe.output_merge_dims is None


def test_a_sequence_first_target_as_long_as_the_batch_follows_the_output() -> None:
    """``[seq, batch]`` targets with seq == the whole batch: dim 0 has the batch's size too, but the target is shaped
    like the output's leading dims, so it splits along the output's merge dim (1), and grads equal the plain
    model's."""
    import copy

    from pippy import Schedule1F1B, SplitPoint, TensorChunkSpec, pipeline
    from pippy.runtime.local import LocalPipeline

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5)).double()
    x, y = torch.randn(8, 8, 4, dtype=torch.float64), torch.randint(0, 5, (8, 8))

    def ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out.reshape(-1, 5), target.reshape(-1))

    pipe = pipeline(copy.deepcopy(model), 4, (x,), split_spec={"1": SplitPoint.END}, args_chunk_spec=(TensorChunkSpec(1),))
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=ce)
    losses: list[torch.Tensor] = []
    lp.step(x, target=y, losses=losses)
    ref = copy.deepcopy(model)
    loss = ce(ref(x), y)
    loss.backward()
    assert torch.allclose(torch.stack(losses).mean(), loss, atol=1e-12)
    for n, p in ref.named_parameters():
        assert torch.allclose(lp.named_grads()[n], p.grad, atol=1e-12), n


@pytest.mark.parametrize(("pos", "said"), [
    (torch.arange(4), "args[1] has 4 along dim 0, the batch (args[0]) has 8"),  # 4 splits by 4: silent before
    (torch.arange(5)[None], "args[1] has 1 along dim 0, the batch (args[0]) has 8"),  # HF-style [1, T] positions
])
def test_an_unbatched_input_split_like_the_batch_gets_a_warning_naming_replicate(pos, said) -> None:
    from pippy import pipe_split, pipeline

    class Pos(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.a, self.b = torch.nn.Embedding(16, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            h = self.a(x) + self.emb(pos)
            pipe_split()
            return self.b(h)

    x = torch.zeros(8, pos.shape[-1], 3)
    assert uneven_split_inputs((x, pos), {}) == said
    with pytest.warns(UserWarning, match=r"differ in size: " + re.escape(said)) as got:
        try:
            pipeline(Pos(), 4, (x, pos))
        except Exception:  # [1, T] cannot be split in 4: the split's own error follows the warning
            pass
    assert "Replicate()" in str(got[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = pipeline(Pos(), 4, (x, pos), args_chunk_spec=(TensorChunkSpec(0), Replicate()))
    assert pipe.num_stages == 2


def test_inputs_batched_along_their_own_dims_or_rates_say_so_by_spec() -> None:
    """A kwarg batched along dim 1 (sequence first), or at twice the rate, is fine once its spec is given."""
    x, mask, pairs = torch.zeros(8, 3), torch.zeros(5, 8), torch.zeros(16, 3)
    assert uneven_split_inputs((x,), {"mask": mask}, None, {"mask": TensorChunkSpec(1)}) == ""
    assert uneven_split_inputs((x,), {"mask": mask}) == "kwargs['mask'] has 5 along dim 0, the batch (args[0]) has 8"
    assert uneven_split_inputs((x, pairs), {}, (None, TensorChunkSpec(0))) == ""
    mbs = split_batch((x, pairs), {}, 4)  # the splitting itself stays as PiPPy's and torch's: each leaf on its own
    assert mbs[0][0][1].shape == (4, 3)


def test_one_row_micro_batches_find_a_moved_batch_by_tracing_two_rows() -> None:
    """Micro-batches of one row: every size-1 dim could be the batch; a trace on two rows shows which one grows."""
    from pippy import Schedule1F1B, pipe_split, pipeline
    from pippy.runtime.local import LocalPipeline

    class SeqFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x).transpose(0, 1)  # [seq, batch, 16], as XLNet's memories
            pipe_split()
            return self.b(h)

    torch.manual_seed(0)
    model = SeqFirst().double()
    x = torch.randn(4, 5, 16, dtype=torch.float64)
    pipe = pipeline(model, 4, (x,))
    assert pipe.output_merge_dims == [1]
    lp = LocalPipeline(pipe, Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=torch.nn.functional.mse_loss)
    torch.testing.assert_close(lp.eval(x), model(x).detach(), rtol=0, atol=1e-12)
    y = torch.randn(5, 4, 16, dtype=torch.float64)
    lp.step(x, target=y)
    torch.nn.functional.mse_loss(model(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(lp.named_grads()[n], p.grad, rtol=0, atol=1e-12, msg=n)


def test_a_split_dim_and_another_dim_of_the_micro_batch_size_are_ambiguous() -> None:
    """Dim 0 split, and another dim as large as a micro-batch (an LSTM's ``h_n`` ``[layers, batch, hidden]`` with 2
    layers and 2-row micro-batches): the plain numbers cannot tell which is the batch."""
    from pippy.microbatch import ambiguous_merge_dims

    x = (torch.zeros(2, 5, 3),)
    assert ambiguous_merge_dims(x, {}, None, None, [(2, 5, 6), (2, 2, 6), (2, 5, 2), (5, 2)]) == [1, 2, 3]


class _LSTM(torch.nn.Module):
    """A batch-first two-layer LSTM returning (logits, h_n): h_n is ``[layers, batch, hidden]``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = torch.nn.Linear(3, 6), torch.nn.Linear(6, 2)
        self.rnn = torch.nn.LSTM(6, 6, num_layers=2, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.emb(x)
        pipe_split()
        o, (hn, _) = self.rnn(h)
        return self.head(o), hn


class _Stacked(torch.nn.Module):
    """Two heads stacked in front of the batch: ``[2, batch, width]``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.a(x))
        pipe_split()
        return self.b(h), torch.stack([self.b(h), self.c(h)])


@pytest.mark.parametrize("cls", [_LSTM, _Stacked], ids=lambda c: c.__name__)
def test_an_output_with_a_leading_dim_as_large_as_a_micro_batch_merges_along_the_batch(cls) -> None:
    """Micro-batches of 2 rows and an output ``[2, batch, ...]``: it merges along dim 1, as the plain model gives it,
    and grads of a loss on both outputs equal the plain model's (float64); before, it was concatenated along dim 0
    (``[8, 2, 6]`` for ``[2, 8, 6]``), with no warning."""
    import copy

    from pippy import ScheduleGPipe, pipeline
    from pippy.runtime.local import LocalPipeline

    torch.manual_seed(0)
    model = cls().double()
    x = torch.randn(8, 5, 3, dtype=torch.float64) if cls is _LSTM else torch.randn(8, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LSTM's non-contiguous weights
        pipe = pipeline(copy.deepcopy(model), 4, (x,))
        assert pipe.output_merge_dims == [0, 1]

        def loss_fn(out: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.mse_loss(out[0], target) + out[1].pow(2).mean()

        lp = LocalPipeline(pipe, ScheduleGPipe, num_ranks=2, n_microbatches=4, loss_fn=loss_fn)
        ref_out = model(x)
        y = torch.randn_like(ref_out[0])
        out = lp.step(x, target=y)
        loss_fn(ref_out, y).backward()
    for got, want in zip(out, ref_out):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12)
    for n, p in model.named_parameters():
        assert torch.allclose(lp.named_grads()[n], p.grad, atol=1e-12), n


def _doc_mask(batch: int) -> tuple[object, object]:
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = torch.tensor([16, 32, 48, 64, 8, 24][:batch])

    def same_doc(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (q // lengths[b] == kv // lengths[b]) & (q >= kv)

    return same_doc, create_block_mask(same_doc, batch, 1, 64, 64, device="cpu", BLOCK_SIZE=16)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("n", [2, 4])
def test_a_flex_attention_block_mask_splits_by_rows(n: int) -> None:
    """Each micro-batch's attention under its part of the mask equals the full batch's rows (a per-row mask)."""
    from torch.nn.attention.flex_attention import flex_attention

    _, mask = _doc_mask(4)
    q = torch.randn(4, 1, 64, 8)
    chunks = split_batch((q,), {"block_mask": mask}, n)
    kwargs = [k for _, k in chunks]
    parts = [flex_attention(a[0], a[0], a[0], block_mask=k["block_mask"]) for a, k in chunks]
    assert [tuple(k["block_mask"].kv_num_blocks.shape) for k in kwargs] == [(4 // n, 1, 4)] * n
    torch.testing.assert_close(torch.cat(parts), flex_attention(q, q, q, block_mask=mask), rtol=0, atol=0)


def test_a_block_mask_for_one_row_broadcasts_and_an_uneven_one_is_refused() -> None:
    _, one = _doc_mask(1)
    assert all(m is one for m in split_value(one, 3))
    _, six = _doc_mask(6)
    with pytest.raises(ValueError, match="BlockMask for a batch of 6 rows, which does not split into 4"):
        split_value({"block_mask": six}, 4, what="keyword argument")


def test_chunk_specs_from_a_tuple_or_a_dict_of_dims() -> None:
    """PyTorch pipelining's helpers: one TensorChunkSpec per int, nested containers kept, specs passed through."""
    args = TensorChunkSpec.from_tuple((0, 1, [0, Replicate()]))
    kwargs = TensorChunkSpec.from_dict({"mask": 1, "ids": 0})
    assert args == (TensorChunkSpec(0), TensorChunkSpec(1), [TensorChunkSpec(0), Replicate()])
    assert kwargs == {"mask": TensorChunkSpec(1), "ids": TensorChunkSpec(0)}
    x, m = torch.arange(12.0).view(2, 6), torch.arange(8.0).view(2, 4)
    mbs = split_batch((x, x), {"mask": m, "ids": m}, 2, args_spec=TensorChunkSpec.from_tuple((0, 1)),
                      kwargs_spec=kwargs)
    assert mbs[0][0][0].shape == (1, 6) and mbs[0][0][1].shape == (2, 3) and mbs[1][1]["mask"].shape == (2, 2)
    assert torch.equal(mbs[1][1]["mask"], m[:, 2:]) and torch.equal(mbs[1][1]["ids"], m[1:])
    with pytest.raises(TypeError, match=r"from_tuple: expected a tuple of ints .* got int"):
        TensorChunkSpec.from_tuple(0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"from_dict: expected a dict of ints .* got tuple"):
        TensorChunkSpec.from_dict((0,))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected an int dim, got True"):
        TensorChunkSpec.from_dict({"x": True})

"""In-process (all ranks in one process) checks: every schedule is transparent, memory counts, CSV schedules."""

from __future__ import annotations

import copy

import pytest
import torch
from models import AuxBranch, MarkedMLP, SkipNet, main_mse, mse

import pippy
from pippy import pipeline
from pippy.runtime.api import PipelineSchedule
from pippy.runtime.local import LocalPipeline
from pippy.schedules.generators import make_schedule
from pippy.schedules.lower import from_csv, to_csv

SCHEDULES = [
    (pippy.ScheduleGPipe, 4),
    (pippy.Schedule1F1B, 4),
    (pippy.ScheduleZBH1, 4),
    (pippy.ScheduleZBH2, 4),
    (pippy.ScheduleInterleaved1F1B, 2),
    (pippy.ScheduleZBH1, 2),  # several stages per rank: interleaved zero bubble
    (pippy.ScheduleLoopedBFS, 2),
    (pippy.ScheduleZBV, 2),
    (pippy.ScheduleDualPipeV, 2),
]


def _setup(model: torch.nn.Module, n_mb: int, batch: int = 8):
    torch.manual_seed(1)
    ref = copy.deepcopy(model)
    x = torch.randn(batch, 8, dtype=torch.float64)
    out = ref(x)
    tgt = torch.randn_like(out)
    loss = mse(out, tgt)
    loss.backward()
    return ref, x, tgt, out, loss, pipeline(model, n_mb, (x,))


def _check(lp: LocalPipeline, ref: torch.nn.Module, got_out, out, losses, loss) -> None:
    assert torch.allclose(got_out, out, atol=1e-12, rtol=0)
    assert len(losses) == lp.schedules[0].n_microbatches
    assert abs(float(torch.stack(losses).mean() - loss)) < 1e-12
    grads = lp.named_grads()
    for name, p in ref.named_parameters():
        assert grads[name] is not None, name
        assert torch.allclose(grads[name], p.grad, atol=1e-12, rtol=0), name


@pytest.mark.parametrize("model_fn", [lambda: MarkedMLP(4, 1), lambda: SkipNet(4)], ids=["mlp", "skip"])
@pytest.mark.parametrize(("cls", "ranks"), SCHEDULES, ids=[f"{c.__name__}-{r}ranks" for c, r in SCHEDULES])
def test_every_schedule_transparent(model_fn, cls, ranks) -> None:
    torch.manual_seed(0)
    ref, x, tgt, out, loss, pipe = _setup(model_fn().double(), 4)
    lp = LocalPipeline(pipe, cls, num_ranks=ranks, n_microbatches=4, loss_fn=mse)
    losses: list[torch.Tensor] = []
    got = lp.step(x, target=tgt, losses=losses)
    _check(lp, ref, got, out, losses, loss)
    assert torch.allclose(lp.eval(x), out, atol=1e-12, rtol=0)
    assert all(st.live_microbatches() == 0 for st in lp.stages)


@pytest.mark.parametrize(("cls", "ranks"), SCHEDULES, ids=[f"{c.__name__}-{r}ranks" for c, r in SCHEDULES])
@pytest.mark.parametrize("ordered", [False, True], ids=["tagged", "ordered"])
def test_parameters_the_loss_never_reaches_keep_no_grad(cls, ranks, ordered) -> None:
    """An aux output the loss ignores: its head's parameters stay ``grad is None``, as unpipelined.

    Tagged transports (gloo) flag a missing gradient beside its zeros; ordered ones (NCCL) send the
    zeros alone, so there the head gets zero gradients (the README says so).
    """
    torch.manual_seed(0)
    model = AuxBranch(4).double()
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    main_mse(ref(x), y).backward()
    lp = LocalPipeline(pipeline(model, 4, (x,)), cls, num_ranks=ranks, n_microbatches=4, loss_fn=main_mse)
    for t in lp.transports:
        t.ordered = ordered
    for _ in range(2):  # a second step accumulates into the same grads, and still keeps None
        lp.step(x, target=y)
    grads = lp.named_grads()
    for name, p in ref.named_parameters():
        if p.grad is None:
            g = grads[name]
            assert g is None if not ordered else (g is None or not g.any()), (name, g)
        else:
            torch.testing.assert_close(grads[name], 2 * p.grad, rtol=0, atol=1e-12, msg=name)
    assert ref.aux.weight.grad is None


def test_more_microbatches_than_traced_chunks() -> None:
    """The schedule's micro-batch count may differ from num_chunks when the micro-batch size matches."""
    torch.manual_seed(0)
    model = MarkedMLP(4, 1).double()
    ref = copy.deepcopy(model)
    pipe = pipeline(model, 2, (torch.randn(4, 8, dtype=torch.float64),))
    x = torch.randn(16, 8, dtype=torch.float64)
    tgt = torch.randn(16, 4, dtype=torch.float64)
    loss = mse(ref(x), tgt)
    loss.backward()
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=4, n_microbatches=8, loss_fn=mse)
    losses: list[torch.Tensor] = []
    lp.step(x, target=tgt, losses=losses)
    assert abs(float(torch.stack(losses).mean() - loss)) < 1e-12
    for name, p in ref.named_parameters():
        assert torch.allclose(lp.named_grads()[name], p.grad, atol=1e-12), name


@pytest.mark.parametrize(("cls", "expected"), [(pippy.Schedule1F1B, 4), (pippy.ScheduleGPipe, 8), (pippy.ScheduleZBH1, 4)])
def test_live_activation_counts_rank0(cls, expected) -> None:
    """1F1B holds at most p micro-batches on rank 0, GPipe all m (counts, not bytes)."""
    torch.manual_seed(0)
    model = MarkedMLP(4, 1).double()
    pipe = pipeline(model, 8, (torch.randn(16, 8, dtype=torch.float64),))
    lp = LocalPipeline(pipe, cls, num_ranks=4, n_microbatches=8, loss_fn=mse)
    lp.step(torch.randn(16, 8, dtype=torch.float64), target=torch.randn(16, 4, dtype=torch.float64))
    assert lp.schedules[0].last_peak_live[0] == expected


def test_schedule_from_csv_runs(tmp_path) -> None:
    torch.manual_seed(0)
    ref, x, tgt, out, loss, pipe = _setup(SkipNet(4).double(), 4)
    path = tmp_path / "zbv.csv"
    to_csv(make_schedule("zbv", 2, 4), path)
    sched = from_csv(path)
    lp = LocalPipeline(pipe, PipelineSchedule, num_ranks=2, n_microbatches=4, loss_fn=mse, schedule=sched)
    losses: list[torch.Tensor] = []
    got = lp.step(x, target=tgt, losses=losses)
    _check(lp, ref, got, out, losses, loss)


def test_sum_reduction_matches_sum_loss() -> None:
    torch.manual_seed(0)
    model = MarkedMLP(2, 1).double()
    ref = copy.deepcopy(model)
    x = torch.randn(8, 8, dtype=torch.float64)
    tgt = torch.randn(8, 4, dtype=torch.float64)

    def sum_mse(o, t):
        return torch.nn.functional.mse_loss(o, t, reduction="sum")

    sum_mse(ref(x), tgt).backward()
    pipe = pipeline(model, 4, (x,))
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=sum_mse, loss_reduction="sum")
    lp.step(x, target=tgt)
    for name, p in ref.named_parameters():
        assert torch.allclose(lp.named_grads()[name], p.grad, atol=1e-11), name


@pytest.mark.parametrize(("cls", "ranks"), [(pippy.ScheduleZBH1, 4), (pippy.ScheduleZBV, 2), (pippy.ScheduleDualPipeV, 2)],
                         ids=["zb_h1", "zbv", "dualpipev"])
def test_stage_without_input_grads_runs_whole_backward(cls, ranks) -> None:
    """Stage 0's inputs need no gradient: its I would feed nobody, so it runs one B at each W's place."""
    torch.manual_seed(0)
    ref, x, tgt, out, loss, pipe = _setup(MarkedMLP(4, 1).double(), 4)
    lp = LocalPipeline(pipe, cls, num_ranks=ranks, n_microbatches=4, loss_fn=mse)
    sch = lp.schedules[0].schedule
    assert sch is not None
    kinds = {(a.stage, a.kind.value) for acts in sch.actions for a in acts if a.kind.is_compute}
    assert (0, "I") not in kinds and (0, "W") not in kinds and (0, "B") in kinds
    assert any(k == "I" for _, k in kinds)  # the other stages still split
    losses: list[torch.Tensor] = []
    got = lp.step(x, target=tgt, losses=losses)
    _check(lp, ref, got, out, losses, loss)


class _SeqFirst(torch.nn.Module):
    """[seq, batch, width] in and out, plus a per-position table that every micro-batch shares."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x + pe.unsqueeze(1)))
        pippy.pipe_split()
        return self.b(h)


@pytest.mark.parametrize(("cls", "ranks"), [(pippy.Schedule1F1B, 2), (pippy.ScheduleZBH1, 2)])
def test_batch_split_on_dim_1_merges_and_splits_the_target_on_dim_1(cls, ranks) -> None:
    # no output_merge_spec / target_chunk_spec: the output keeps the batch at dim 1, so both follow the inputs
    torch.manual_seed(0)
    model = _SeqFirst().double()
    x, pe, y = (torch.randn(*s, dtype=torch.float64) for s in ((8, 4, 8), (8, 8), (8, 4, 8)))
    ref = copy.deepcopy(model)
    out = ref(x, pe)
    mse(out, y).backward()
    pipe = pipeline(model, 4, (x, pe), args_chunk_spec=(pippy.TensorChunkSpec(1), pippy.Replicate()))
    assert pipe.output_merge_dims == [1]
    assert torch.allclose(pipe(x, pe)[0], out, atol=1e-12)
    lp = LocalPipeline(pipe, cls, num_ranks=ranks, n_microbatches=4, loss_fn=mse)
    got = lp.step(x, pe, target=y)
    assert got.shape == out.shape and torch.allclose(got, out, atol=1e-12)
    assert torch.allclose(lp.eval(x, pe), out, atol=1e-12)
    grads = lp.named_grads()
    for n, p in ref.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-12), n


class _OwnLoss(torch.nn.Module):
    """A model that computes its own loss, reduced as ``kind`` says."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.a(x))
        pippy.pipe_split()
        logits = self.b(h)
        if self.kind == "norm":  # no batch reduction the graph names: pippy cannot tell, and says so
            return {"loss": logits.norm(), "logits": logits}
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction=self.kind)
        return {"loss": loss * 0.5 if self.kind == "sum" else loss, "logits": logits}


@pytest.mark.parametrize("cls", [pippy.ScheduleGPipe, pippy.Schedule1F1B, pippy.ScheduleZBH1])
@pytest.mark.parametrize("kind", ["sum", "mean"])
def test_a_model_s_own_loss_reduction_is_read_from_its_graph(cls, kind: str) -> None:
    torch.manual_seed(0)
    model = _OwnLoss(kind).double()
    x, labels = torch.randn(8, 8, dtype=torch.float64), torch.randint(0, 4, (8,))
    ref = copy.deepcopy(model)
    want = ref(x, labels)["loss"]
    want.backward()
    lp = LocalPipeline(pipeline(copy.deepcopy(model), 4, (x, labels)), cls, num_ranks=2, n_microbatches=4)
    assert lp.schedules[0].loss_reduction == kind
    got = lp.step(x, labels)
    assert torch.allclose(got["loss"], want, atol=1e-12)  # a summed loss comes back summed
    grads = lp.named_grads()
    for name, p in ref.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-12), name


def test_an_own_loss_of_unknown_reduction_warns() -> None:
    x, labels = torch.randn(8, 8), torch.randint(0, 4, (8,))
    with pytest.warns(UserWarning, match="cannot tell whether the model's own loss sums or averages"):
        LocalPipeline(pipeline(_OwnLoss("norm"), 4, (x, labels)), pippy.Schedule1F1B, num_ranks=2, n_microbatches=4)


class _StopGradient(torch.nn.Module):
    """Stage 1's output is detached: stage 2's inputs need no gradient, though a stage feeds it."""

    def __init__(self) -> None:
        super().__init__()
        self.ls = torch.nn.ModuleList([torch.nn.Linear(6, 6) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.ls[0](x))
        pippy.pipe_split()
        h = torch.tanh(self.ls[1](h)).detach()
        pippy.pipe_split()
        h = torch.tanh(self.ls[2](h))
        pippy.pipe_split()
        return self.ls[3](h)


@pytest.mark.parametrize("cls", [pippy.ScheduleZBV, pippy.ScheduleDualPipeV, pippy.ScheduleZBH1])
@pytest.mark.parametrize("fill", [True, False])
def test_a_stop_gradient_between_stages_schedules_and_trains_exactly(cls: type, fill: bool) -> None:
    torch.manual_seed(0)
    model = _StopGradient().double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    lp = LocalPipeline(pipeline(model, 4, (x,)), cls, num_ranks=2, n_microbatches=4, loss_fn=mse,
                       fill_bubbles=fill)
    lp.step(x, target=y)
    mse(model(x), y).backward()
    grads = lp.named_grads()
    for name, p in model.named_parameters():
        if p.grad is None:
            assert grads[name] is None or not grads[name].any(), name
        else:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("cls,spr", [(pippy.Schedule1F1B, 1), (pippy.ScheduleZBV, 2)])
def test_a_losses_list_reused_holds_only_the_last_steps(cls, spr) -> None:
    """As in PyTorch's pipelining: each step empties ``losses`` first (eval(target=) too)."""
    model = MarkedMLP(4, per_stage=1 if spr == 2 else 2).double()
    _, x, tgt, _, loss, pipe = _setup(model, 4)
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=4, loss_fn=mse)
    losses: list[torch.Tensor] = [torch.tensor(99.0)]
    for _ in range(2):
        lp.step(x, target=tgt, losses=losses)
        assert len(losses) == 4
    lp.eval(x, target=tgt, losses=losses)
    assert len(losses) == 4 and abs(float(torch.stack(losses).mean() - loss)) < 1e-12  # no optimizer: same model

"""The bad-input catalogue of README "Troubleshooting": each mistake gets a message saying what, where and how to fix."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from models import MarkedMLP, mse
from torch import nn

import pippy
from pippy import PipeliningShapeError, PipeTraceError, SplitPoint, StageError, pipe_split, pipeline
from pippy.runtime.local import LocalPipeline
from pippy.runtime.localcomm import LocalTransport
from pippy.runtime.userstage import _StageCall
from pippy.schedules import ScheduleError

F64 = torch.float64


def x8(rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, 8, dtype=F64)


def two_stage_pipe() -> Any:
    return pipeline(MarkedMLP(2, 1).double(), 2, (x8(),))


def drive(scheds: list[Any], inputs: list[tuple[Any, ...]], targets: list[Any]) -> list[Any]:
    """One training step of every rank, in this process, through the public begin / advance / finish."""
    runs = [s.begin(a, target=t) for s, a, t in zip(scheds, inputs, targets)]
    for _ in range(1000):
        if all(r.done for r in runs):
            break
        for r in runs:
            if not r.done:
                r.advance()
    return [s.finish(r) for s, r in zip(scheds, runs)]


# ------------------------------------------------------------------ 1. split points traced oddly
class LoopSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
            pipe_split()  # runs once per iteration: three split points, the last one after all the work
        return x


def test_split_point_in_a_loop_is_named_when_the_stage_count_surprises() -> None:
    pipe = pipeline(LoopSplit().double(), 2, (x8(),))
    assert pipe.num_stages == 3 and pipe.split_sites is not None and len(pipe.split_sites) == 3
    with pytest.raises(StageError) as info:
        pippy.Schedule1F1B(pipe.build_stage(0, "cpu"), 2, mse, transport=LocalTransport.world(2)[0])
    msg = str(info.value)
    assert "world size is 2 but the pipe has 3 stages" in msg  # what came
    assert "test_troubleshooting.py" in msg and "pipe_split()" in msg  # where
    assert "traced 3 times: it runs in a loop, one split point per pass; if fewer were meant, guard it" in msg
    assert "the last of them comes after the last computation of forward and makes no stage" in msg


class BranchSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        if x.sum() > 0:
            pipe_split()
        return self.b(x)


def test_split_point_in_a_data_dependent_branch() -> None:
    with pytest.raises(PipeTraceError) as info:
        pipeline(BranchSplit().double(), 2, (x8(),))
    msg = str(info.value)
    assert "could not trace BranchSplit" in msg and "if x.sum() > 0:" in msg  # what and where
    assert "data-dependent control flow" in msg
    assert "A pipe_split() inside such a branch cannot work either" in msg and "move it out of the branch" in msg


class TwoSplitsInARow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        pipe_split()
        pipe_split()
        return self.b(x)


class SplitFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pipe_split()
        return self.a(x)


def test_split_points_that_leave_a_stage_empty() -> None:
    with pytest.raises(PipeTraceError, match=r"stage 1 of 3 would be empty: nothing is computed between") as info:
        pipeline(TwoSplitsInARow().double(), 2, (x8(),))
    assert "test_troubleshooting.py" in str(info.value) and "remove one of the two" in str(info.value)
    with pytest.raises(PipeTraceError, match=r"stage 0 of 2 would be empty: the split point .* before any computation"):
        pipeline(SplitFirst().double(), 2, (x8(),))
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)).double()
    spec = {"0": SplitPoint.END, "1": SplitPoint.BEGINNING}  # END of one module plus BEGINNING of the next
    with pytest.raises(PipeTraceError, match=r"between the split points SplitPoint\.END of '0' \(split_spec / annotate_"
                                             r"split_points\) and SplitPoint\.BEGINNING of '1'"):
        pipeline(model, 2, (x8(),), split_spec=spec)


class SplitLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.a(x))
        pipe_split()
        return x


def test_split_points_after_the_last_computation_warn() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).double()
    with pytest.warns(UserWarning, match=r"the split point SplitPoint\.END of '1' .* comes after the last computation "
                                         r"of forward.* the pipe has 2 stages for 2 split points. To get 3 stages") as rec:
        pipe = pipeline(model, 2, (x8(),), split_spec={"0": SplitPoint.END, "1": SplitPoint.END})
    assert pipe.num_stages == 2 and rec[0].filename == __file__  # attributed to the caller's line
    with pytest.warns(UserWarning, match=r"test_troubleshooting.py:\d+ in forward: pipe_split\(\) comes after the last computation"):
        assert pipeline(SplitLast().double(), 2, (x8(),)).num_stages == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipeline(model, 2, (x8(),), split_spec={"0": SplitPoint.END}).num_stages == 2


# ------------------------------------------------------------------ 2. outputs the loss cannot use
class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.a(x)
        pipe_split()
        return {"logits": self.b(h)}


class StrOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> str:
        self.a(x)
        return "done"


class LossFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.a(x)
        return out.pow(2).mean(), out  # (loss, logits), as Hugging Face's return_dict=False gives


def test_a_loss_logits_tuple_runs_forward_only_and_says_how_to_train_on_it() -> None:
    lp = LocalPipeline(pipeline(LossFirst().double(), 2, (x8(),)), pippy.ScheduleGPipe, num_ranks=1, n_microbatches=2)
    with pytest.warns(UserWarning, match=r"ran forward only.*first output is a scalar.*'loss' key"):
        lp.step(x8())


def test_model_output_without_a_loss_and_no_loss_fn() -> None:
    # as in PiPPy and torch.distributed.pipelining: no loss anywhere -> step() runs forward only, with a warning
    model = DictOut().double()
    lp = LocalPipeline(pipeline(model, 2, (x8(),)), pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2)
    x = x8()
    with pytest.warns(UserWarning, match=r"no loss_fn and the model's output has no loss, so step\(\) ran forward only"):
        out = lp.step(x)
    assert torch.allclose(out["logits"], model(x)["logits"], atol=1e-12)
    assert all(g is None for g in lp.named_grads().values())
    # a step that is asked to train (begin(training=True)) still says what is missing
    lp = LocalPipeline(pipeline(StrOut().double(), 2, (x8(),)), pippy.ScheduleGPipe, num_ranks=1, n_microbatches=2)
    with pytest.raises(StageError, match=r"rank 0, stage 0, micro-batch 0.*needs a scalar loss.*got str"):
        lp._drive((x8(),), {}, None, None, training=True)


# ------------------------------------------------------------------ 3. loss_fn signature
def test_loss_fn_with_the_wrong_signature_fails_when_the_schedule_is_built() -> None:
    pipe = two_stage_pipe()
    stage = pipe.build_stage(1, "cpu")
    ends = LocalTransport.world(2)
    with pytest.raises(TypeError) as info:
        pippy.ScheduleGPipe(stage, 2, loss_fn=lambda out: out.sum(), transport=ends[1])
    msg = str(info.value)
    assert "ScheduleGPipe on rank 1: loss_fn <lambda>(out) cannot be called as loss_fn(output, target)" in msg
    assert "(stage 1) calls loss_fn(output, target) for every micro-batch" in msg
    assert "def loss_fn(output, target)" in msg

    def three(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return out.sum()

    with pytest.raises(TypeError, match=r"loss_fn three\(out.*cannot be called as loss_fn\(output, target\)"):
        pippy.ScheduleGPipe(stage, 2, loss_fn=three, transport=ends[1])
    with pytest.raises(TypeError, match=r"loss_fn must be callable as loss_fn\(output, target\), got str"):
        pippy.ScheduleGPipe(stage, 2, loss_fn="mse", transport=ends[1])  # type: ignore[arg-type]
    pippy.ScheduleGPipe(stage, 2, loss_fn=nn.MSELoss(), transport=ends[1])  # a module: (*args) passes


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_loss_fn_failing_inside_names_rank_stage_microbatch_and_shapes() -> None:
    lp = LocalPipeline(two_stage_pipe(), pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2, loss_fn=mse)
    with pytest.raises(StageError) as info:
        lp.step(x8(), target=torch.randn(4, 5, dtype=F64))  # target width 5, output width 4
    msg = str(info.value)
    assert "rank 1, stage 1, micro-batch 0" in msg and "loss_fn(output, target) raised RuntimeError" in msg
    assert "output float64[2, 4], target float64[2, 5]" in msg
    assert "the target's shape [2, 5] differs from the output's [2, 4] beyond the batch" in msg, msg

    def own_bug(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise ValueError("negative temperature")

    lp = LocalPipeline(two_stage_pipe(), pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2, loss_fn=own_bug,
                       loss_reduction="mean")
    with pytest.raises(StageError) as info:
        lp.step(x8(), target=torch.randn(4, 4, dtype=F64))
    msg = str(info.value)  # a bug inside loss_fn is not blamed on the target
    assert "raised ValueError: negative temperature" in msg and "inside loss_fn itself" in msg, msg
    assert "make step(target=...) match" not in msg


def test_a_target_with_other_rows_than_the_batch_is_refused_before_splitting() -> None:
    """6 rows for a batch of 4: the plain model's loss refuses it; split into micro-batches it could broadcast."""
    lp = LocalPipeline(two_stage_pipe(), pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2, loss_fn=mse)
    with pytest.raises(ValueError, match=r"rank 1, stage 1, splitting the target .* target leaf 0 has 6 rows along dim "
                                         r"0, but the batch has 4 \(2 micro-batches of 2\).*target_chunk_spec"):
        lp.step(x8(), target=torch.randn(6, 4, dtype=F64))


def test_a_target_of_the_wrong_kind_and_losses_not_a_list_get_the_right_fix() -> None:
    lp = LocalPipeline(two_stage_pipe(), pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2, loss_fn=mse)
    with pytest.raises(StageError) as info:
        lp.step(x8(), target=[torch.randn(4, 4, dtype=F64)])  # a list where mse_loss wants a tensor
    msg = str(info.value)
    assert "target list of 1: [float64[2, 4]]" in msg and "pass step(target=...) as a tensor" in msg, msg
    assert "two positional arguments" not in msg
    lp = LocalPipeline(two_stage_pipe(), pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2, loss_fn=mse)
    with pytest.raises(TypeError, match=r"step\(losses=...\) must be a list .* got tuple; pass losses=\[\]"):
        lp.step(x8(), target=torch.randn(4, 4, dtype=F64), losses=())


# ------------------------------------------------------------------ 4. target on the wrong rank
def test_target_on_a_rank_without_the_last_stage() -> None:
    torch.manual_seed(0)
    model = MarkedMLP(2, 1).double()
    ref = copy.deepcopy(model)
    x, y = x8(), torch.randn(4, 4, dtype=F64)
    pipe = pipeline(model, 2, (x,))

    def scheds() -> list[Any]:
        ends = LocalTransport.world(2)
        return [pippy.ScheduleGPipe(pipe.build_stage(r, "cpu"), 2, mse, transport=ends[r]) for r in range(2)]

    with pytest.raises(StageError, match=r"rank 1, stage 1 \(last\): loss_fn is set but target is None"):
        drive(scheds(), [(x,), ()], [y, None])  # the target went to rank 0 only
    s = scheds()  # given everywhere (the README idiom step(..., target=y) on every rank): ignored where unused
    out = drive(s, [(x,), ()], [y, y])[1]
    mse(ref(x), y).backward()
    assert torch.allclose(out, ref(x), atol=1e-12)
    for st in s:
        for name, p in st.stages[0].submod.named_parameters():
            assert torch.allclose(p.grad, ref.get_parameter(name).grad, atol=1e-12), name


def test_inputs_on_the_wrong_rank() -> None:
    pipe = two_stage_pipe()
    ends = LocalTransport.world(2)
    s = [pippy.ScheduleGPipe(pipe.build_stage(r, "cpu"), 2, mse, transport=ends[r]) for r in range(2)]
    with pytest.warns(UserWarning, match=r"rank 1 does not hold stage 0: the inputs given to step\(\)/eval\(\) here are ignored"):
        s[1].begin((x8(),), target=torch.randn(4, 4, dtype=F64)).abort(RuntimeError("test"), in_flight=False, raised_here=False)
    with pytest.raises(StageError, match=r"gpipe: rank 0 holds stage 0 but step\(\)/eval\(\) got no inputs; "
                                         r"pass the batch here \(step\(x\) on this rank"):
        s[0].begin(())
    call = _StageCall(pipe.build_stage(0, "cpu"), 2, transport=LocalTransport.world(2)[0])
    with pytest.raises(StageError, match=r"stage\(x\): rank 0 holds stage 0 but stage\(\) got no inputs; pass the "
                                         r"batch here \(stage\(x\) on this rank; the other ranks pass none\)"):
        call.begin((), training=False)


# ------------------------------------------------------------------ 5. micro-batches of different shapes
class ListIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        h = self.a(xs[0]) + self.a(xs[1])
        pipe_split()
        return self.b(h)


def test_batches_whose_microbatches_differ() -> None:
    pipe = pipeline(ListIn().double(), 2, ([x8(), x8()],))
    lp = LocalPipeline(pipe, pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2, loss_fn=mse)
    y = torch.randn(4, 4, dtype=F64)
    with pytest.raises(ValueError) as info:
        lp.step([x8(), x8(6)], target=y)  # the second list entry has 6 rows, the first 4
    msg = str(info.value)
    assert "input leaf 1 (args[0][1]): a micro-batch has shape (3, 8)" in msg
    assert "traced for (2, 8)" in msg and "Replicate()" in msg
    with pytest.raises(ValueError, match=r"leaf 1 \(args\[0\]\[1\]\) has size 5 .* multiple of 2"):
        lp.step([x8(), x8(5)], target=y)
    with pytest.raises(PipeliningShapeError, match=r"dtype mismatch at input leaf 0 \(args\[0\]\[0\]\): a micro-batch "
                       r"is torch\.float32 \(shape \(2, 8\) as traced\), but the pipeline was traced for torch\.float64"):
        lp.step([x8().float(), x8()], target=y)  # float32 where float64 was traced


# ------------------------------------------------------------------ 6. integer inputs next to float inputs
class IdsAndFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.pos = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.emb(ids) + self.lin(feats))
        pipe_split()
        return self.head(h + self.pos(ids))  # the int ids are read again by the last stage


def test_integer_inputs_need_no_gradient_and_float_inputs_get_theirs() -> None:
    torch.manual_seed(0)
    model = IdsAndFeatures().double()
    ref = copy.deepcopy(model)
    ids, feats, y = torch.randint(0, 10, (4, 5)), torch.randn(4, 5, 8, dtype=F64), torch.randn(4, 5, 3, dtype=F64)
    pipe = pipeline(model, 2, (ids, feats))
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=mse)
    out = lp.step(ids, feats, target=y)
    mse(ref(ids, feats), y).backward()
    assert torch.allclose(out, ref(ids, feats), atol=1e-12)
    for name, g in lp.named_grads().items():
        assert g is not None and torch.allclose(g, ref.get_parameter(name).grad, atol=1e-12), name


# ------------------------------------------------------------------ 7. / 8. devices
def test_example_inputs_on_another_device_than_the_model() -> None:
    with pytest.raises(PipeTraceError) as info:
        pipeline(MarkedMLP(2, 1).double(), 2, (torch.empty(4, 8, dtype=F64, device="meta"),))
    msg = str(info.value)
    assert "example input args[0] is on meta but MarkedMLP's parameters and buffers are on cpu" in msg
    assert "pass example_args/example_kwargs on cpu" in msg and "torch.device('meta')" in msg


def test_stage_on_a_device_the_pipeline_cannot_use() -> None:
    pipe = two_stage_pipe()
    with pytest.raises(StageError, match=r"build_stage\(0, 'meta'\): a stage cannot run on the meta device.*checkpoint="):
        pipe.build_stage(0, "meta")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        with pytest.raises(StageError, match=rf"cuda:{n} does not exist; this machine has {n} CUDA device"):
            pipe.build_stage(0, f"cuda:{n}")
    else:
        with pytest.raises(StageError, match=r"build_stage\(1, 'cuda'\): this machine has no CUDA device.*'cpu'"):
            pipe.build_stage(1, "cuda")
    with pytest.raises(ValueError, match=r"'gpu' is not a torch device .*Pass 'cpu', 'cuda'"):
        pipe.build_stage(0, "gpu")


# ------------------------------------------------------------------ 9. micro-batch counts a schedule cannot take
def test_microbatch_count_a_multi_stage_schedule_cannot_take() -> None:
    pipe = pipeline(MarkedMLP(4, 1).double(), 2, (x8(8),))
    ends = LocalTransport.world(2)
    mine = [pipe.build_stage(0, "cpu"), pipe.build_stage(3, "cpu")]
    with pytest.raises(ValueError) as info:
        pippy.ScheduleDualPipeV(mine, 2, mse, transport=ends[0])
    msg = str(info.value)
    assert "ScheduleDualPipeV on rank 0 of 2: dualpipev: got p=2, m=2, but it requires m >= 2p-1 = 3" in msg
    assert "Fix: use at least 3 micro-batches, or zbv / zb_h1" in msg
    pippy.ScheduleDualPipeV(mine, 3, mse, transport=ends[0])
    pippy.ScheduleInterleaved1F1B([mine[0], pipe.build_stage(2, "cpu")], 1, mse, transport=ends[0])  # m < p is fine
    three = pipeline(MarkedMLP(3, 1).double(), 2, (x8(),))
    with pytest.raises(StageError, match=r"on 2 rank\(s\) this schedule runs 4 stages, 2 per rank "
                                         r".* but the pipe has 3 stages, 2 of them passed on this rank\. Expected 4 "
                                         r"stages: split the model into 4 stages "
                                         r"\(its 3 stages come from the split points .*models\.py"):
        pippy.ScheduleLoopedBFS([three.build_stage(0, "cpu"), three.build_stage(2, "cpu")], 2, mse,
                                transport=LocalTransport.world(2)[0])


# ------------------------------------------------------------------ 10. hand-written CSV schedules
def csv_schedule(tmp_path: Path, text: str, rank: int = 0, stage: int = 0) -> Any:
    path = tmp_path / "my.csv"
    path.write_text(text)
    pipe = two_stage_pipe()
    return pippy.ScheduleFromCSV(str(path), pipe.build_stage(stage, "cpu"), mse, transport=LocalTransport.world(2)[rank])


def test_csv_schedule_mistakes(tmp_path: Path) -> None:
    with pytest.raises(ScheduleError) as info:
        csv_schedule(tmp_path, "0F0,0F1,0B0\n1F0,1B0,1F1,1B1\n")  # 0B1 forgotten
    assert "0B1 missing: 0F1 has no complete backward" in str(info.value)
    assert "fix: add 0B1 to rank 0 after 0F1" in str(info.value) and "[0F1]" in str(info.value)
    with pytest.raises(ScheduleError) as info:  # rank 0 waits for 1B0, which rank 1 runs after 1F1, after 0F1
        csv_schedule(tmp_path, "0F0,0B0,0F1,0B1\n1F1,1B1,1F0,1B0\n")
    msg = str(info.value)
    assert "deadlock: no rank can move on" in msg and "rank 0 step 1: 0B0 waits for 1B0 (rank 1 step 3)" in msg
    assert "reorder the ranks' lists" in msg
    with pytest.raises(ScheduleError, match=r"0F1 runs on rank 1, but stage 0 lives on rank 0(?s:.*)fix: move 0F1"):
        csv_schedule(tmp_path, "# stage_to_rank: 0 1\n0F0,0B0\n1F0,1B0,0F1,0B1\n")  # stage 0 work in rank 1's row
    with pytest.raises(StageError, match=r"rank 0 was given stages \[0\] but the schedule places stages \[1\] on it"):
        csv_schedule(tmp_path, "1F0,1B0\n0F0,0B0\n")  # the CSV puts stage 1 on rank 0
    with pytest.raises(ValueError, match=r"stage 0 has actions on ranks 0 and 1.*pass stage_to_rank="):
        csv_schedule(tmp_path, "0F0,1F0\n0B0,1B0\n")
    with pytest.warns(UserWarning, match=r"my.csv has 1 micro-batches .* traced with num_chunks=2"):
        csv_schedule(tmp_path, "0F0,0B0\n1F0,1B0\n")  # micro-batch 1 forgotten


# ------------------------------------------------------------------ 11. / 14. indices and counts
def test_stage_index_out_of_range_or_not_an_int() -> None:
    pipe = two_stage_pipe()
    for bad in (2, -1):
        with pytest.raises(IndexError, match=rf"stage index {bad} out of range: this pipe has stages 0\.\.1.*Pass an"):
            pipe.build_stage(bad, "cpu")
    for bad in (1.0, "0", True):
        with pytest.raises(TypeError, match=r"stage index must be an int in 0\.\.1, got .*build_stage\(dist.get_rank"):
            pipe.build_stage(bad, "cpu")  # type: ignore[arg-type]


PIPE_FOR_COUNTS = two_stage_pipe()


@pytest.mark.parametrize("bad", [0, -1, 2.0, "2", True])
def test_microbatch_counts_that_are_not_positive_ints(bad: Any) -> None:
    with pytest.raises(ValueError, match=rf"num_chunks must be a positive int .*got {bad!r}"):
        pipeline(MarkedMLP(2, 1).double(), bad, (x8(),))
    stage = PIPE_FOR_COUNTS.build_stage(0, "cpu")
    with pytest.raises(ValueError, match=rf"ScheduleGPipe: n_microbatches must be a positive int .*got {bad!r}"):
        pippy.ScheduleGPipe(stage, bad, mse, transport=LocalTransport.world(2)[0])


# ------------------------------------------------------------------ 13. an optimizer of the traced model
def test_optimizer_created_before_build_stage_is_refused() -> None:
    torch.manual_seed(0)
    model = MarkedMLP(2, 1).double()
    stale = torch.optim.SGD(model.parameters(), lr=0.1)  # made before build_stage: holds the traced tensors
    pipe = pipeline(model, 2, (x8(),))
    lp = LocalPipeline(pipe, pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2, loss_fn=mse)
    lp.step(x8(), target=torch.randn(4, 4, dtype=F64))
    with pytest.raises(StageError) as info:
        stale.step()
    msg = str(info.value)
    assert "optimizer SGD holds 10 parameters of MarkedMLP, the model pippy traced, e.g. blocks.0.0.weight (stage 0)" in msg
    assert "none of its parameters has a gradient" in msg and "would never update anything" in msg
    assert "create the optimizer from stage.parameters() after build_stage" in msg
    before = [p.detach().clone() for st in lp.stages for p in st.parameters()]
    good = torch.optim.SGD([p for st in lp.stages for p in st.parameters()], lr=0.1)
    good.step()  # the stages' own copies have gradients: fine, and they move
    assert any(not torch.equal(b, p) for b, p in zip(before, (p for st in lp.stages for p in st.parameters())))


def test_optimizer_guard_leaves_ordinary_optimizers_alone() -> None:
    other = nn.Linear(3, 1)
    torch.optim.SGD(other.parameters(), lr=0.1).step()  # no gradient at all, but never traced: no error
    model = MarkedMLP(2, 1).double()
    pipe = pipeline(model, 2, (x8(),))
    pipe.build_stage(0, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the traced model trained as a plain model: it has grads
    mse(model(x8()), torch.randn(4, 4, dtype=F64)).backward()
    opt.step()
    plain = torch.optim.Adam(nn.Linear(2, 2).parameters())
    for _ in range(3):
        plain.step()  # cached verdict: one lookup per step


# ------------------------------------------------------------------ 15. split specs and split-less models
def test_split_spec_values_and_a_model_without_split_points() -> None:
    model = MarkedMLP(2, 1).double()
    with pytest.raises(PipeTraceError, match=r"split point for 'blocks\.0' must be SplitPoint\.BEGINNING or Spl.*'end'"):
        pipeline(model, 2, (x8(),), split_spec={"blocks.0": "end"})  # type: ignore[dict-item]
    one = pipeline(nn.Sequential(nn.Linear(8, 4)).double(), 2, (x8(),))
    with pytest.raises(StageError) as info:
        pippy.Schedule1F1B(one.build_stage(0, "cpu"), 2, mse, transport=LocalTransport.world(2)[0])
    msg = str(info.value)
    assert msg.startswith("Schedule1F1B: world size is 2 but the pipe has 1 stages")
    with pytest.raises(StageError, match=r"^stage\(x\): world size is 2 but"):  # what the user called, not a class
        _StageCall(one.build_stage(0, "cpu"), 2, transport=LocalTransport.world(2)[0])
    assert "the model has no split point (no pipe_split() in forward, no split_spec, no split_policy)" in msg


# ------------------------------------------------------------------ 16. other things passed where a stage belongs
def test_things_that_are_not_this_ranks_stages() -> None:
    pipe = two_stage_pipe()
    t = LocalTransport.world(2)[0]
    with pytest.raises(TypeError, match=r"Schedule1F1B on rank 0: expected the runtime stage\(s\) of this rank, got "
                                        r"a GraphModule \(pipe\.get_stage_module\(i\)\?\)"):
        pippy.Schedule1F1B(pipe.get_stage_module(0), 2, mse, transport=t)
    with pytest.raises(TypeError, match=r"got the pipe itself \(MarkedMLP, 2 stages\).*pipe.build_stage\(i, device\)"):
        pippy.Schedule1F1B(pipe, 2, mse, transport=t)
    with pytest.raises(TypeError, match=r"stages\[1\] is Linear \(a module"):
        pippy.ScheduleInterleaved1F1B([pipe.build_stage(0, "cpu"), nn.Linear(2, 2)], 2, mse, transport=t)
    four = pipeline(MarkedMLP(4, 1).double(), 2, (x8(),))
    again = pipeline(MarkedMLP(4, 1).double(), 2, (x8(),))
    with pytest.raises(StageError, match=r"stages 0 and 2 were built from two different pipes \(two pipeline\(\) calls"):
        pippy.ScheduleInterleaved1F1B([four.build_stage(0, "cpu"), again.build_stage(2, "cpu")], 2, mse, transport=t)
    s0 = four.build_stage(0, "cpu")
    with pytest.raises(StageError, match=r"stage 0 was given twice"):
        pippy.ScheduleInterleaved1F1B([s0, s0], 2, mse, transport=t)
    with pytest.raises(StageError, match=r"Schedule1F1B runs one stage per rank; got 2 stages \[0, 2\] on rank 0"):
        pippy.Schedule1F1B([s0, four.build_stage(2, "cpu")], 2, mse, transport=t)


def test_schedule_or_stage_call_without_a_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover - the suite runs without a default group
        pytest.skip("a default process group exists in this process")
    stage = two_stage_pipe().build_stage(0, "cpu")
    with pytest.raises(StageError, match=r"Schedule1F1B: no torch.distributed process group.*LocalPipeline"):
        pippy.Schedule1F1B(stage, 2, mse)
    with pytest.raises(StageError, match=r"stage\(x\): no torch.distributed process group.*init_process_group"):
        stage(x8())


def test_step_under_no_grad_names_no_grad() -> None:
    x, y = torch.randn(4, 8), torch.randn(4, 4)
    pipe = pipeline(MarkedMLP(2, 1), 2, (x,))
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=mse)
    with torch.no_grad(), pytest.raises(StageError, match=r"step\(\) runs under torch.no_grad\(\).*eval\(\.\.\.\)"):
        lp.step(x, target=y)
    one = pipeline(torch.nn.Linear(8, 4), 2, (x,))
    sched = pippy.ScheduleGPipe(one.build_stage(0, "cpu"), 2, mse, transport=LocalTransport.world(1)[0])
    with torch.no_grad(), pytest.raises(StageError, match=r"gpipe: rank 0: step\(\) runs under torch.no_grad"):
        sched.step(x, target=y)
    assert sched.step(x, target=y).shape == (4, 4)  # refused up front: the schedule still runs


def test_a_stage_of_neither_a_pipe_nor_a_module_points_at_both_forms() -> None:
    from pippy.PipelineStage import PipelineStage

    with pytest.raises(TypeError, match=r"pippy.pipeline\(model, ...\) or a module you cut yourself .*got dict"):
        PipelineStage({"layers": 2}, 0, "cpu")  # type: ignore[arg-type]
    assert isinstance(PipelineStage(nn.Linear(8, 8), 0, 2, "cpu"), PipelineStage)  # torch's form: shapes come later


def test_stage_load_state_dict_takes_what_state_dict_gives() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    a, b = pipeline(MarkedMLP(2, 1), 2, (x,)), pipeline(MarkedMLP(2, 1), 2, (x,))
    src, dst = a.build_stage(1, "cpu"), b.build_stage(1, "cpu")
    dst.load_state_dict(src.state_dict())
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())
    with pytest.raises(RuntimeError, match=r"stage 1: load_state_dict expected this stage's keys.*unexpected"):
        dst.load_state_dict({**src.state_dict(), "nope": torch.zeros(1)})
    assert dst.load_state_dict({**src.state_dict(), "nope": torch.zeros(1)}, strict=False).unexpected_keys == ["nope"]


def test_a_full_batch_as_manual_input_args_is_named_as_such() -> None:
    x = torch.randn(8, 3)
    stage = pippy.ManualPipelineStage(nn.Linear(3, 5), 0, 1, "cpu", 2, input_args=x)
    with pytest.raises(ValueError, match=r"ManualPipelineStage's input_args gave \(8, 3\).*one micro-batch"):
        stage.pipe.split_inputs((x,), {}, 2)


def test_a_sub_group_rank_is_told_from_its_global_rank(monkeypatch) -> None:
    """Global rank 2 in a group of global ranks [1, 2] is the group's rank 1: the message says which it means."""
    from pippy.runtime import guards
    from pippy.schedules import gpipe

    monkeypatch.setattr(guards.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(guards.dist, "get_process_group_ranks", lambda group: [1, 2])
    monkeypatch.setattr(guards.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(guards.dist, "get_rank", lambda: 2)
    with pytest.raises(StageError, match=r"rank 1 of the pipeline's group \(global rank 2; the group's ranks are the "
                                         r"global ranks \[1, 2\] in that order.*given stages \[0\]"):
        guards.check_placement("gpipe", 1, [_Indexed(0)], 2, gpipe(2, 2), object())


class _Indexed:
    def __init__(self, index: int) -> None:
        self.index = index


def test_a_split_policy_given_by_name_says_to_pass_the_function() -> None:
    from pippy import pipeline

    with pytest.raises(TypeError, match=r"split_policy must be a function such as autosplit\(4\)"):
        pipeline(torch.nn.Linear(2, 2), 2, (torch.ones(4, 2),), split_policy="autosplit")  # type: ignore[arg-type]


def test_compute_dtype_without_fsdp_mixed_precision_says_what_casts_the_parameters() -> None:
    from pippy import SplitPoint, pipeline

    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    pipe = pipeline(net, 2, (torch.randn(4, 4),), split_spec={"0": SplitPoint.END}, compute_dtype=torch.bfloat16)
    lp = LocalPipeline(pipe, pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2, loss_fn=mse)
    with pytest.raises(RuntimeError) as info:  # a float32 batch is cast to bfloat16 first, as FSDP2's policy casts it
        lp.step(torch.randn(4, 4), target=torch.randn(4, 4))
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "stage 0's parameters are ['torch.float32'] but its graph was traced computing in ['torch.bfloat16']" in notes
    assert "MixedPrecisionPolicy(param_dtype=...)" in notes and "torch.autocast" in notes


def test_a_checkpoint_under_a_prefix_names_the_missing_keys_and_the_prefix(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*(nn.Linear(4, 4) for _ in range(4)))
    torch.save({"model." + k: v for k, v in net.state_dict().items()}, tmp_path / "full.pt")
    with torch.device("meta"):
        meta = nn.Sequential(*(nn.Linear(4, 4) for _ in range(4)))
    pipe = pipeline(meta, 2, (torch.randn(4, 4, device="meta"),), split_spec={"1": SplitPoint.END})
    with pytest.raises(KeyError, match=r"stage 1: the checkpoint lacks 4 of the stage's parameters and persistent "
                                       r"buffers: \['2.weight', .* under the prefix 'model.'"):
        pipe.build_stage(1, "cpu", checkpoint=tmp_path / "full.pt")


def test_one_param_group_over_parameters_saved_with_different_learning_rates_is_named(tmp_path: Path) -> None:
    from pippy import checkpoint

    net = nn.Sequential(*(nn.Linear(4, 4) for _ in range(4)))
    pipe = pipeline(net, 2, (torch.randn(4, 4),), split_spec={str(i): SplitPoint.END for i in range(3)})
    stages = [pipe.build_stage(i, "cpu") for i in range(4)]
    opt = torch.optim.SGD([{"params": st.parameters(), "lr": 0.01 * (st.index + 1)} for st in stages])
    checkpoint.save(stages, tmp_path, optimizer=opt)
    with pytest.raises(ValueError, match=r"optimizer group 0 holds parameters that the checkpoint's optimizer kept in "
                                         r"groups with different hyperparameters: lr=0.02 for \[stage 1 '1.weight', "
                                         r".*\]; lr=0.03 for \[stage 2 '2.weight'"):
        checkpoint.load(stages[1:3], tmp_path, optimizer=torch.optim.SGD([*stages[1].parameters(),
                                                                         *stages[2].parameters()], lr=0.1))

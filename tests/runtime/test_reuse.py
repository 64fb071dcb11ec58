"""Long-lived objects: schedules and stages used again after a change, a refused step, or a forward-only call."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from models import MLPStack, mse

import pippy
from pippy import SplitPoint, pipeline
from pippy.runtime.local import LocalPipeline

F64 = torch.float64


def _pipe(n: int = 2) -> pippy.Pipe:
    torch.manual_seed(0)
    return pipeline(MLPStack(n=n, d=8).double(), 4, (torch.randn(8, 8, dtype=F64),),
                    split_spec={f"blocks.{i}": SplitPoint.END for i in range(n - 1)})


@pytest.mark.parametrize("new", [8, 2])
def test_changing_n_microbatches_after_construction_is_refused(new: int) -> None:
    lp = LocalPipeline(_pipe(), pippy.Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=mse)
    for sch in lp.schedules:
        sch.n_microbatches = new  # before: ran 4 of 8 micro-batches silently, or an IndexError for 2
    with pytest.raises(ValueError, match=rf"n_microbatches is {new}, but this schedule was built .* for 4.*build a "
                                         "new schedule"):
        lp.step(torch.randn(16, 8, dtype=F64), target=torch.randn(16, 4, dtype=F64))


def test_a_step_refused_on_one_rank_leaves_the_local_pipeline_usable() -> None:
    """Rank 0 counts the step before rank 1 refuses it (no target): the next step must not see the ranks' step counts
    (which pick the messages' tags) apart."""
    model = MLPStack(n=2, d=8).double()
    torch.manual_seed(0)
    pipe = pipeline(model, 4, (torch.randn(8, 8, dtype=F64),), split_spec={"blocks.0": SplitPoint.END})
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=4, loss_fn=mse)
    x, y = torch.randn(8, 8, dtype=F64), torch.randn(8, 4, dtype=F64)
    with pytest.raises(pippy.StageError, match="target is None"):
        lp.step(x)
    model.zero_grad()
    mse(model(x), y).backward()
    lp.step(x, target=y)
    ref = dict(model.named_parameters())
    assert max(float((g - ref[k].grad).abs().max()) for k, g in lp.named_grads().items()) < 1e-13


def test_a_stage_called_forward_only_is_freed_with_its_schedule(world_of_one: None) -> None:
    pipe = pipeline(torch.nn.Linear(8, 4).double(), 2, (torch.randn(4, 8, dtype=F64),))
    stage = pipe.build_stage(0, "cpu")
    out = stage(torch.randn(4, 8, dtype=F64))
    assert out.shape == (4, 4)
    gone = weakref.ref(stage)
    del stage
    gc.collect()
    assert gone() is None  # before: a global table kept every called stage (and its waiter thread)


def test_stage_state_dict_takes_the_module_options() -> None:
    stage = _pipe().build_stage(0, "cpu")
    sd = stage.state_dict(prefix="m.", keep_vars=True)
    assert all(k.startswith("m.") for k in sd) and any(isinstance(v, torch.nn.Parameter) for v in sd.values())
    new = {k: torch.zeros_like(v) for k, v in stage.state_dict().items()}
    stage.load_state_dict(new, assign=True)
    assert all(stage.unwrapped.get_parameter(k) is not None and not stage.unwrapped.get_parameter(k).any()
               for k, v in new.items() if k in dict(stage.unwrapped.named_parameters()))
    w = next(iter(new))
    assert dict(stage.unwrapped.named_parameters())[w].data_ptr() == new[w].data_ptr()  # assigned, not copied


def test_eval_with_a_target_but_no_loss_says_the_target_is_unused() -> None:
    lp = LocalPipeline(_pipe(), pippy.Schedule1F1B, num_ranks=2, n_microbatches=4)
    losses: list[torch.Tensor] = []
    with pytest.warns(UserWarning, match=r"eval\(\) got target= / losses=, but the schedule has no loss_fn.*Pass "
                                         r"loss_fn="):
        lp.eval(torch.randn(8, 8, dtype=F64), target=torch.randn(8, 4, dtype=F64), losses=losses)
    assert losses == []

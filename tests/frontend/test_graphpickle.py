"""Stage modules with batch norm pickle, ``torch.save`` and deepcopy; the copies keep their statistics and follow modes."""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
from models import mse, train_steps
from torch import fx, nn

import pippy
from pippy import SplitPoint, pipeline
from pippy.frontend.graphpickle import graph_from_state, graph_state
from pippy.runtime.local import LocalPipeline

X = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
Y = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _torch_save(m: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m)), "torch.save": _torch_save}


def _bn_stages(mode: str) -> list[pippy.runtime.stage.Stage]:
    """Linear, BatchNorm1d, Tanh, Linear, BatchNorm1d in 2 stages, trained 2 steps (running statistics moved)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 4), nn.BatchNorm1d(4)).double()
    getattr(net, mode)()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batch norm in train mode")
        pipe = pipeline(net, 2, (X,), split_spec={"2": SplitPoint.END})
    lp = LocalPipeline(pipe, pippy.Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=mse)
    train_steps(lp, [torch.optim.SGD([p for st in lp.stages for p in st.parameters()], lr=0.1)], 2, X, Y)
    return lp.stages


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_copies_of_batch_norm_stages_keep_statistics_and_follow_train_and_eval(mode: str, how: str) -> None:
    stages = _bn_stages(mode)
    if mode == "train":
        assert stages[0].state_dict()["1.num_batches_tracked"].item() == 4  # 2 steps x 2 micro-batches
    for st in stages:
        orig = st.submod
        cp = COPIES[how](orig)
        want = orig.state_dict()
        got = cp.state_dict()
        assert list(got) == list(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
        x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        for flip in ("same", "eval" if mode == "train" else "train", mode):
            if flip != "same":
                orig.train(flip == "train")
                cp.train(flip == "train")
            assert torch.equal(cp(x)[0], orig(x)[0]), flip
            after, now = orig.state_dict(), cp.state_dict()
            assert all(torch.equal(now[k], after[k]) for k in after), flip  # running stats moved alike (or not)
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(cp.state_dict().values(), orig.state_dict().values()))


def test_a_copy_of_a_copy_still_pickles_with_its_non_persistent_buffers() -> None:
    stages = _bn_stages("eval")
    cp = _torch_save(copy.deepcopy(_torch_save(stages[1].submod)))
    assert list(cp.state_dict()) == list(stages[1].submod.state_dict())
    assert type(cp.get_submodule("4")).__name__ == "OutlinedModule"


def test_graph_state_keeps_names_ops_and_the_metadata_pippy_reads() -> None:
    g = fx.Graph()
    x = g.placeholder("x")
    w = g.get_attr("w")
    y = g.call_function(torch.ops.aten.linear.default, (x, w), {})
    y.meta.update(nn_module_stack={"L__self__": ("", "M")}, pippy_traced_arg=(5, "training", True),
                  val=torch.empty(2, 3), from_node=object())
    z = g.call_function(torch.ops.aten.add, (y, [y, 1]), {"alpha": 2})
    g.output((z,))
    back = graph_from_state(pickle.loads(pickle.dumps(graph_state(g))))
    assert [n.format_node() for n in back.nodes] == [n.format_node() for n in g.nodes]
    ny = list(back.nodes)[2]
    assert ny.meta["nn_module_stack"] == {"L__self__": ("", "M")} and ny.meta["pippy_traced_arg"] == (5, "training", True)
    assert ny.meta["val"].shape == (2, 3) and ny.meta["val"].is_meta and "from_node" not in ny.meta
    assert ny.target is torch.ops.aten.linear.default and list(back.nodes)[3].target is torch.ops.aten.add


def test_a_pipe_pickles_without_its_live_model_and_trains_like_the_original() -> None:
    """A pipe refers weakly to the model it traced and to this process's built stages; a pickled copy leaves them out
    (they do not pickle) and builds and trains its own stages exactly as the original does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    pipe = pipeline(model, 2, (X,), split_spec={"1": SplitPoint.END})
    pipe.build_stage(0, "cpu")  # a live stage: a weak reference in the pipe
    copied = pickle.loads(pickle.dumps(pipe))
    assert copied.source_model() is None and copied.num_stages == 2
    runs = [LocalPipeline(p, pippy.Schedule1F1B, num_ranks=2, n_microbatches=2, loss_fn=mse) for p in (pipe, copied)]
    for lp in runs:
        lp.step(X, target=Y)
    a, b = (lp.named_grads() for lp in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_runtime_stage_pickles_after_training_and_runs_the_same() -> None:
    """A built stage (its outlined module and its flat graph, which split backward taps) through torch.save."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    pipe = pipeline(net.double(), 2, (x,), split_spec={"1": SplitPoint.END})
    lp = LocalPipeline(pipe, pippy.ScheduleGPipe, num_ranks=2, n_microbatches=2, loss_fn=mse)
    lp.step(x, target=y)

    def first(out: object) -> torch.Tensor:
        return out[0] if isinstance(out, tuple | list) else out  # type: ignore[index,return-value]

    h = first(lp.stages[0].submod(x[:4]))
    for st, inp in zip(lp.stages, (x[:4], h.detach())):
        buf = io.BytesIO()
        torch.save(st, buf)
        _ = buf.seek(0)
        back = torch.load(buf, weights_only=False)
        assert back.steps_trained == st.steps_trained == 1
        assert (back._flat_graph is back.submod.graph) == (st._flat_graph is st.submod.graph)
        for mine, theirs in ((back.submod, st.submod), (back.flat_module(), st.flat_module())):
            mine.eval()
            theirs.eval()
            assert torch.equal(first(mine(inp)), first(theirs(inp)))

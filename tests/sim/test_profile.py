"""profile(): a two-stage Pipe gives a CostModel with positive times and sizes."""

import pytest

torch = pytest.importorskip("torch")


def test_profile_two_stages(tmp_path) -> None:
    from pippy import SplitPoint, pipeline
    from pippy.sim.cost import CostModel
    from pippy.sim.profile import profile

    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    pipe = pipeline(net, 2, example_args=(x,), split_spec={"2": SplitPoint.BEGINNING})
    c = profile(pipe, (x,), repeats=1)
    assert c.num_stages == 2 and c.microbatches == 2
    assert all(s.f > 0 for s in c.stages)
    assert c.stages[1].i > 0  # stage 1's input comes from stage 0 and needs a gradient
    assert c.stages[0].send_bytes == 4 * 32 * 4  # micro-batch of 4 rows x 32 float32
    assert c.stages[1].send_bytes == 0
    assert c.stages[0].act_bytes > 0 and c.stages[0].static_bytes == 2 * 4 * (16 * 32 + 32)
    c.to_json(tmp_path / "c.json")
    assert CostModel.from_json(tmp_path / "c.json") == c


def test_profile_through_the_runtime_stage() -> None:
    from pippy import SplitPoint, pipeline
    from pippy.sim.profile import profile

    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    pipe = pipeline(net, 2, example_args=(x,), split_spec={"2": SplitPoint.BEGINNING})
    threads = torch.get_num_threads()
    c = profile(pipe, (x,), loss_fn=torch.nn.functional.mse_loss, target=y, repeats=1, warmup=0, threads=1)
    assert torch.get_num_threads() == threads  # restored
    for s in c.stages:  # both ways timed: plain F + one-pass B, tapped F + I + W
        assert s.f > 0 and s.i > 0 and s.w > 0
        assert s.fused_b is not None and s.fused_b > 0 and s.split_f is not None and s.split_f > 0
        assert s.b == s.fused_b
    assert c.stages[0].grad_bytes == c.stages[0].send_bytes == 4 * 64 * 4


def test_median_costs_is_fieldwise() -> None:
    import math

    from pippy.sim.cost import CostModel, StageCost
    from pippy.sim.profile import median_costs

    models = [
        CostModel(stages=[StageCost(f=f, grad_bytes=g)], latency=lat, bandwidth=bw, microbatches=4)
        for f, g, lat, bw in ((1.0, None, 1e-4, 1e9), (3.0, 8.0, 3e-4, math.inf), (2.0, 4.0, 2e-4, 2e9))
    ]
    m = median_costs(models)
    assert m.stages[0].f == 2.0 and m.stages[0].grad_bytes == 6.0  # None entries are skipped
    assert m.latency == 2e-4 and m.bandwidth == 2e9 and m.microbatches == 4
    with pytest.raises(ValueError, match="stage count"):
        median_costs([models[0], CostModel.uniform(2)])


def test_profile_rounds_keep_no_tensors_alive() -> None:
    """Repeated profiling (e.g. between training steps) must not leak the forwards it measured."""
    import gc

    from pippy import SplitPoint, pipeline
    from pippy.sim.profile import profile

    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    pipe = pipeline(net, 2, example_args=(x,), split_spec={"2": SplitPoint.BEGINNING})

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    profile(pipe, (x,), loss_fn=torch.nn.functional.mse_loss, target=y, repeats=1, warmup=0)
    before = live_tensors()
    for _ in range(3):
        profile(pipe, (x,), loss_fn=torch.nn.functional.mse_loss, target=y, repeats=1, warmup=0)
    assert live_tensors() == before


def test_activation_bytes_are_stable_and_old_option_is_ignored() -> None:
    """Saved tensors stay alive while they are counted (no address reuse hides one); split_backward is a no-op."""
    import pippy
    from pippy import SplitPoint, pipeline

    blocks = []
    for _ in range(4):
        blocks += [torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.LayerNorm(32)]
    net = torch.nn.Sequential(*blocks, torch.nn.Linear(32, 4))
    x, y = torch.randn(16, 32), torch.randn(16, 4)
    pipe = pipeline(net, 2, example_args=(x,), split_spec={"6": SplitPoint.BEGINNING})
    sizes = {pippy.profile(pipe, (x,), loss_fn=torch.nn.functional.mse_loss, target=y, repeats=1, warmup=0).stages[0].act_bytes
             for _ in range(3)}
    assert len(sizes) == 1
    # each of stage 0's GELUs and LayerNorms saves at least its 8x32 float input: 6 distinct tensors
    assert sizes.pop() >= 6 * 8 * 32 * 4
    with pytest.warns(DeprecationWarning, match="split_backward"):
        pippy.profile(pipe, (x,), loss_fn=torch.nn.functional.mse_loss, target=y, repeats=1, warmup=0, split_backward=True)

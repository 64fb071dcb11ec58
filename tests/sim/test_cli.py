"""CLI: every command runs in-process and prints what it documents; bad arguments fail in one line."""

import json

import pytest

from pippy.cli import main, parse_size
from pippy.sim.cost import CostModel, StageCost


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("cmd", ["show", "simulate", "compare", "tune", "trace-compare"])
def test_help(capsys, cmd: str) -> None:
    rc, out, _ = _run(capsys, cmd, "--help")
    assert rc == 0 and "usage: pippy " + cmd in out
    assert _run(capsys, "--help")[0] == 0


def test_show(capsys) -> None:
    rc, out, _ = _run(capsys, "show", "1f1b", "--ranks", "4", "--microbatches", "8")
    assert rc == 0
    assert out.splitlines()[1].startswith("rank 0 0F0 0F1 0F2 0F3 0B0")
    rc, out, _ = _run(capsys, "show", "1f1b", "--ranks", "2", "--microbatches", "2", "--lowered")
    assert rc == 0 and "SEND_F" in out


def test_simulate(capsys, tmp_path) -> None:
    png, trace, tl = tmp_path / "a.png", tmp_path / "a.json", tmp_path / "tl.json"
    rc, out, _ = _run(capsys, "simulate", "zbv", "--ranks", "8", "--microbatches", "32", "--no-color",
                      "--png", str(png), "--trace", str(trace), "--save-timeline", str(tl))
    assert rc == 0
    assert sum(1 for ln in out.splitlines() if ln.startswith("rank ")) % 8 == 0  # 8 ranks, in pages
    assert "\x1b[" not in out and "step time:" in out and "peak memory" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(trace.read_text())["traceEvents"]
    rc, out, err = _run(capsys, "trace-compare", str(tl), str(tl))
    assert rc == 0 and "+0.0%" in out and "warning" not in err
    other = tmp_path / "other.json"
    assert _run(capsys, "simulate", "1f1b", "--ranks", "8", "--microbatches", "8", "--save-timeline", str(other))[0] == 0
    rc, out, err = _run(capsys, "trace-compare", str(tl), str(other))
    assert rc == 0 and "warning: the timelines are of different runs" in err and "32 micro-batches" in err


def test_simulate_with_costs_file(capsys, tmp_path) -> None:
    p = tmp_path / "c.json"
    CostModel(stages=[StageCost(f=0.01, i=0.01, w=0.01, act_bytes=2**30)] * 4, microbatches=8).to_json(p)
    rc, out, err = _run(capsys, "simulate", "1f1b", "-p", "4", "-m", "8", "--costs", str(p))
    assert rc == 0 and "GiB" in out and "ms" in out and "note" not in err
    rc, out, err = _run(capsys, "simulate", "1f1b", "-p", "2", "-m", "8", "--costs", str(p))
    assert rc == 0 and "has 4 stage(s) and 1f1b on 2 ranks has 2: the costs are spread" in err


def test_compare(capsys) -> None:
    rc, out, _ = _run(capsys, "compare", "--ranks", "4", "--microbatches", "8")
    assert rc == 0
    for name in ("gpipe", "1f1b", "zb_h1", "zbv", "dualpipev"):
        assert any(ln.startswith(name + " ") for ln in out.splitlines())
    assert "bound" in out and "gap %" in out
    zbv = next(line for line in out.splitlines() if line.startswith("zbv "))
    assert "25.5 units" in zbv  # ZB-V's bound on 4 ranks, 8 micro-batches: its gap to it is what a better order can win


def test_compare_skips_impossible(capsys) -> None:
    rc, out, _ = _run(capsys, "compare", "--ranks", "4", "--microbatches", "1")
    assert rc == 0 and "skipped" in out


def test_tune(capsys, tmp_path) -> None:
    p = tmp_path / "c.json"
    CostModel(stages=[StageCost(f=0.01, i=0.01, w=0.01, act_bytes=2**30)] * 4, microbatches=1, latency=1e-3).to_json(p)
    rc, out, _ = _run(capsys, "tune", "--costs", str(p), "--memory-limit", "900MiB", "--microbatches-choices", "1,2,4,8")
    assert rc == 0
    assert out.startswith("recommended: ")
    assert "rejected for memory" in out and "it beat" in out
    rc, out, _ = _run(capsys, "tune", "--costs", str(p), "--memory-limit", "1MiB")
    assert rc == 1 and "no schedule fits" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["show", "nope", "-p", "2", "-m", "2"], "valid names: gpipe, 1f1b"),
        (["simulate", "1f1b", "-p", "0", "-m", "2"], "--ranks"),
        (["tune", "--costs", "x.json", "--memory-limit", "8 parsecs"], "--memory-limit"),
        (["tune", "--costs", "x.json", "--memory-limit", "1G", "--microbatches-choices", "a,b"], "--microbatches-choices"),
        (["frobnicate"], "invalid choice"),
        (["simulate", "1f1b", "-p", "2", "-m", "2", "--costs", "/nonexistent.json"], "nonexistent"),
    ],
)
def test_bad_arguments_one_line(capsys, argv: list[str], needle: str) -> None:
    rc, _out, err = _run(capsys, *argv)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_parse_size() -> None:
    assert parse_size("8GiB") == 8 * 2**30
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1e9") == 1e9
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize(
    ("costs", "needle"),
    [
        ({"stages": [{"f": -1}]}, "stage 0: f must be a finite number >= 0, got -1.0"),
        ({"stages": [{"f": 1}], "microbatches": -2}, "microbatches must be an int >= 1, got -2"),
        ({"stages": [{"f": 1}], "microbatches": 0}, "microbatches must be an int >= 1, got 0"),
        ({"stages": [{"f": 1, "send_bytes": 100}], "bandwidth": 0}, "bandwidth must be a positive number"),
        ({"stages": [{"f": 1}], "latency": -5}, "latency must be a finite number of seconds >= 0, got -5.0"),
        ({"stages": [{"f": float("nan")}]}, "stage 0: f must be a finite number >= 0, got nan"),
        ({"stages": [{"f": "fast"}]}, "stage 0: f must be a number, got 'fast'"),
    ],
)
def test_cost_files_with_unusable_numbers_are_refused_by_name(capsys, tmp_path, costs: dict, needle: str) -> None:
    """Negative, NaN or zero-bandwidth costs once gave a made-up deadlock, a step faster than its compute, or a raw
    traceback; the CLI now names the file and the field."""
    p = tmp_path / "c.json"
    p.write_text(json.dumps(costs))
    rc, _out, err = _run(capsys, "simulate", "1f1b", "-p", "2", "-m", "2", "--costs", str(p))
    assert rc == 2 and needle in err and str(p) in err, err


def test_tune_with_free_costs_and_without_stages(capsys, tmp_path) -> None:
    p = tmp_path / "zero.json"
    p.write_text(json.dumps({"stages": [{"f": 0, "i": 0, "w": 0}] * 2}))
    rc, out, _ = _run(capsys, "tune", "--costs", str(p), "--memory-limit", "1GiB")
    assert rc == 0 and "(+0.0%)" in out
    p.write_text(json.dumps({"stages": []}))
    rc, _out, err = _run(capsys, "tune", "--costs", str(p), "--memory-limit", "1GiB")
    assert rc == 2 and "has no stages" in err


def test_python_entry_points_check_their_costs_and_counts() -> None:
    from pippy.schedules.generators import one_f_one_b
    from pippy.sim.bound import lower_bound
    from pippy.sim.simulate import simulate
    from pippy.sim.synthesize import synthesize

    sched = one_f_one_b(2, 4)
    with pytest.raises(ValueError, match="f must be a finite number"):
        simulate(sched, CostModel.uniform(2, f=-1.0))
    with pytest.raises(TypeError, match="costs must be a CostModel"):
        simulate(sched, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cost model has 1 stages"):
        lower_bound(sched, CostModel.uniform(1))
    for p, m in ((0, 4), (2, 0)):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            synthesize(p, m, CostModel.uniform(2))
    with pytest.raises(ValueError, match="memory_limit"):
        synthesize(2, 4, CostModel.uniform(2), memory_limit=float("nan"))


def test_under_torchrun_only_rank_0_runs_a_command(capsys, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert main(["show", "1f1b", "-p", "2", "-m", "2"]) == 0
    assert capsys.readouterr() == ("", "")  # not the output a fourth time
    monkeypatch.setenv("RANK", "0")
    assert main(["show", "1f1b", "-p", "2", "-m", "2"]) == 0
    out, err = capsys.readouterr()
    assert "rank 0" in out or "F0" in out
    assert "launched on 4 ranks, but this command runs in one process: rank 0 runs it, ranks 1..3 do nothing" in err

"""What the CLI prints about its numbers and files: which fuse_backward a step time assumes, unit costs as
units, output paths and matplotlib checked before simulating, bad cost files refused, a closed pipe."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pippy.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _step(out: str) -> str:
    m = re.search(r"step time: (\S+ \S+)", out)
    assert m, out
    return m.group(1)


def test_simulate_and_compare_agree_and_say_which_form(capsys: pytest.CaptureFixture[str]) -> None:
    """compare showed zbv 25.5 and simulate 27 for p=4, m=8, with only a long footnote saying why."""
    rc, out, _ = _run(capsys, "compare", "-p", "4", "-m", "8")
    assert rc == 0 and "fuse_backward='auto'" in out.splitlines()[1]
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith(("zbv ", "dualpipev "))}
    for name in ("zbv", "dualpipev"):
        auto, default = " ".join(rows[name][1:3]), " ".join(rows[name][3:5])
        rc, out, _ = _run(capsys, "simulate", name, "-p", "4", "-m", "8", "--no-color", "--fuse-backward", "auto")
        assert rc == 0 and _step(out) == auto and "runs as: fuse_backward='auto'" in out, (name, out)
        rc, out, _ = _run(capsys, "simulate", name, "-p", "4", "-m", "8", "--no-color")
        assert rc == 0 and _step(out) == default and "runs as: fuse_backward=True" in out, (name, out)
        assert auto != default, name  # the two forms differ here, and both outputs say which is which


def test_unit_costs_are_units_and_trace_compare_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Unit costs were printed as seconds, and trace-compare gave +56221% against a real run with no hint."""
    from pippy.schedules.ir import Action
    from pippy.sim.render import to_chrome_trace
    from pippy.sim.timeline import Event, Timeline

    pred, chrome = tmp_path / "pred.json", tmp_path / "pred_trace.json"
    rc, out, _ = _run(capsys, "simulate", "1f1b", "-p", "2", "-m", "2", "--no-color", "--save-timeline", str(pred),
                      "--trace", str(chrome))
    assert rc == 0 and "step time: 9 units" in out and "9s" not in out
    assert json.loads(pred.read_text())["unit_costs"] is True
    assert json.loads(chrome.read_text())["otherData"]["unit_costs"] is True
    real = Timeline([Event(0, Action.parse("0F0"), 0.0, 1e-3), Event(1, Action.parse("1F0"), 1e-3, 2e-3)], 2)
    (tmp_path / "run.json").write_text(json.dumps(to_chrome_trace(real)))
    rc, out, err = _run(capsys, "trace-compare", str(pred), str(tmp_path / "run.json"))
    assert rc == 0 and "unit costs" in err and "n/a (units differ)" in out and "%" not in out.splitlines()[2]
    rc, out, _ = _run(capsys, "compare", "-p", "2", "-m", "2")
    assert "9 units" in out


@pytest.mark.parametrize("flag", ["--png", "--trace", "--save-timeline"])
def test_unwritable_outputs_fail_before_simulating(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    rc, out, err = _run(capsys, "simulate", "1f1b", "-p", "2", "-m", "2", flag, "/nonexistent-dir/x.out")
    assert rc == 2 and out == "" and err.count("\n") == 1, (out, err)
    assert f"{flag} /nonexistent-dir/x.out" in err and "does not exist" in err


def test_trace_path_checked_when_the_schedule_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """trace='/bad/path' once failed after the first step, with pathlib's FileNotFoundError naming no option."""
    import torch

    from pippy import Schedule1F1B, pipeline
    from pippy.runtime.localcomm import LocalTransport

    pipe = pipeline(torch.nn.Linear(2, 2), 2, (torch.ones(4, 2),))
    for kwargs, env, needle in (({"trace": "/nonexistent-dir/t.json"}, None, "trace='/nonexistent-dir/t.json'"),
                                ({}, "/nonexistent-dir/t.json", "PIPPY_TRACE='/nonexistent-dir/t.json'")):
        if env:
            monkeypatch.setenv("PIPPY_TRACE", env)
        with pytest.raises(ValueError, match=re.escape(needle) + ".*does not exist"):
            Schedule1F1B(pipe.build_stage(0, "cpu"), 2, transport=LocalTransport.world(1)[0], **kwargs)


@pytest.mark.parametrize("content", ['{"stages": "x"}', '{"stages": []}'])
def test_bad_or_empty_cost_file_is_one_error_everywhere(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                        content: str) -> None:
    """compare listed every schedule as skipped under an empty table and exited 0."""
    p = tmp_path / "c.json"
    p.write_text(content)
    errs = []
    for argv in (["compare", "-p", "2", "-m", "2"], ["simulate", "1f1b", "-p", "2", "-m", "2"],
                 ["tune", "--memory-limit", "1e9"]):
        rc, out, err = _run(capsys, *argv, "--costs", str(p))
        assert rc == 2 and out == "" and err.count("\n") == 1 and str(p) in err, (argv, out, err)
        errs.append(err.split(": error: ", 1)[1])
    assert len(set(errs)) == 1, errs
    if "[]" in content:
        assert "has no stages; give one entry per stage" in errs[0]


def test_png_without_matplotlib_is_one_line_before_simulating(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    rc, out, err = _run(capsys, "simulate", "1f1b", "-p", "2", "-m", "2", "--png", str(tmp_path / "t.png"))
    assert rc == 2 and out == "" and err == "pippy simulate: error: --png needs matplotlib: pip install matplotlib " \
                                           "(or pippy[viz])\n"


def test_closed_pipe_is_quiet() -> None:
    """`pippy compare ... | head -1` sometimes printed "error: [Errno 32] Broken pipe"."""
    root = Path(__file__).resolve().parents[2]
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-m", "pippy", "compare", "-p", "8", "-m", "32"], cwd=root,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PYTHONPATH": str(root)})
        assert p.stdout is not None and p.stderr is not None
        p.stdout.readline()
        p.stdout.close()
        err = p.stderr.read().decode()
        p.wait(60)
        assert "Broken pipe" not in err and "Traceback" not in err, err


def test_synthesize_reports_progress_and_fits_the_terminal(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """tune --synthesize ran for minutes in silence and printed ~490-character grid lines."""
    from pippy.sim.cost import CostModel

    p = tmp_path / "c.json"
    CostModel.uniform(2).to_json(str(p))
    monkeypatch.setenv("COLUMNS", "40")
    argv = ["tune", "--costs", str(p), "--memory-limit", "1e9", "--microbatches-choices", "2,8", "--synthesize"]
    rc, out, err = _run(capsys, *argv)
    assert rc == 0 and "synthesize: 1/4 (2 micro-batches, 2 stages), 0s so far" in err
    assert "synthesize: 4/4 (8 micro-batches, 4 stages)" in err and "left" in err
    assert max(len(ln) for ln in out.splitlines() if ln.startswith("rank ")) <= 40
    assert "--save-csv writes the whole schedule" in out
    rc, _, err = _run(capsys, *argv, "--quiet")
    assert rc == 0 and err == ""

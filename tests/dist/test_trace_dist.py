"""Tracing a real 2-rank run: one event per action of the lowered schedule on every rank, Chrome JSON per rank."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from harness import run_ranks
from trace_cases import traced_steps

from pippy.cli import main
from pippy.sim.compare import load_timeline

CASES = [("1f1b", 1), ("zbv", 2)]


def test_trace_covers_every_action_and_writes_chrome_json(tmp_path: Path, capsys) -> None:
    reports = run_ranks(tmp_path, 2, traced_steps, CASES, str(tmp_path))
    for name, _ in CASES:
        r0 = reports[0][name]
        want = Counter(r0["schedule"])
        assert Counter(r0["timeline"]) == want, name  # every action of every rank, once per step
        assert r0["num_ranks"] == 2 and r0["ordered"], name
        for rank, rep in enumerate(reports):  # each rank's own events are its share of the schedule
            assert Counter(rep[name]["own"]) == Counter(a for a in want.elements() if a.startswith(f"{rank}:")), (name, rank)
        assert any("SEND_F" in a for a in want) and any("RECV_B" in a for a in want), name  # lowered: comm too

        data = json.loads(Path(r0["chrome"]).read_text())
        events = data["traceEvents"]
        tracks = {e["tid"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
        assert tracks == {0, 1}, name
        assert {e["tid"] for e in events if e["ph"] == "X"} == {0, 1}, name
        assert sum(1 for e in events if e["ph"] == "X") == sum(want.values()), name

        tl = load_timeline(r0["chrome"])  # the Chrome JSON of a real run loads back as a Timeline
        assert Counter(f"{e.rank}:{e.action}" for e in tl.events) == want, name
        assert tl.num_ranks == 2 and tl.step_time > 0

    # the CLI lays a prediction beside the real run's Chrome JSON
    pred = tmp_path / "pred.json"
    assert main(["simulate", "1f1b", "-p", "2", "-m", "4", "--no-color", "--save-timeline", str(pred)]) == 0
    capsys.readouterr()
    assert main(["trace-compare", str(pred), reports[0]["1f1b"]["chrome"], "--per-action"]) == 0
    out = capsys.readouterr().out
    assert "bubble rank 1" in out and "stage 1 B" in out


def test_profile_ranks_gathers_every_stage_and_the_link(tmp_path: Path) -> None:
    from trace_cases import ranked_profile

    reports = run_ranks(tmp_path, 2, ranked_profile)
    assert reports[0]["costs"]["stages"] and len(reports[0]["costs"]["stages"]) == 2
    c = reports[0]["costs"]
    assert c["latency"] > 0 and (c["bandwidth"] is None or c["bandwidth"] > 0)  # measured (inf if noise hides bytes)
    assert c == reports[1]["costs"]  # every rank gets the same model
    for s in c["stages"]:  # full and split backward both timed, on each stage's own rank
        assert s["f"] > 0 and s["fused_b"] > 0 and s["split_f"] > 0 and s["i"] > 0 and s["w"] >= 0
    assert c["stages"][0]["send_bytes"] == reports[0]["sent"] > 0 and c["stages"][1]["send_bytes"] == 0
    assert c["microbatches"] == 2


def test_traced_ranks_share_one_clock(tmp_path: Path) -> None:
    """Rank 0 leaves the trace barrier 50 ms late (and then rank 1's wall clock is 3 s ahead, as on
    another host): still no receive ends before its send starts, and on one host the latency stays small."""
    from trace_cases import skewed_clocks

    for offset in (0.0, 3.0):
        (tmp_path / str(offset)).mkdir()
        rep = run_ranks(tmp_path / str(offset), 2, skewed_clocks, str(tmp_path), offset)[0]
        assert len(rep["pairs"]) == 8, rep  # 1F1B, 4 micro-batches: 4 activations and 4 gradients, each matched
        bad = [p for p in rep["pairs"] if p[3] < p[1]]
        assert not bad, (offset, bad)  # (send, its start, receive, its end): receive ends after its send starts
        assert rep["latency"] is None or rep["latency"] >= 0
        if not offset:
            assert rep["latency"] is not None and rep["latency"] < 0.03, rep  # not the 50 ms barrier skew

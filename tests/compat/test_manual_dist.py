"""ManualPipelineStage (the user's own stage modules, no tracing) under every schedule family, on 2 spawned gloo ranks."""

from __future__ import annotations

from harness import run_ranks
from manual_cases import (
    SCHEDULES,
    autocast_steps,
    changed_outputs,
    keyword_forms,
    lazy_form,
    lazy_mismatch,
    lazy_side_effects,
    lazy_specs,
    learned_then_smaller,
    manual_mismatch,
    manual_stages,
    stage_shapes,
    titan_form,
)

TOL = 1e-12


def test_manual_stages_are_transparent_under_every_schedule(tmp_path) -> None:
    reports = run_ranks(tmp_path, 2, manual_stages)
    for name in SCHEDULES:
        for rank, rep in enumerate(reports):
            assert rep[name]["grad_err"] < TOL, (name, rank, rep[name])
        last = reports[1][name] if "loss_err" in reports[1][name] else reports[0][name]
        assert last["loss_err"] < 1e-10 and last["out_err"] < TOL, (name, last)


def test_mismatched_hand_cut_stages_fail_on_every_rank(tmp_path) -> None:
    msgs = run_ranks(tmp_path, 2, manual_mismatch)
    for msg in msgs:
        assert "stage 0" in msg and "stage 1" in msg, msg


def test_pipeline_stage_keyword_forms(tmp_path) -> None:
    reports = run_ranks(tmp_path, 2, keyword_forms)
    assert reports[1]["step"] < TOL and reports[1]["eval"] < TOL


def test_get_and_validate_stage_shapes(tmp_path) -> None:
    reports = run_ranks(tmp_path, 2, stage_shapes)
    got = {s: v for rep in reports for s, v in rep["shapes"].items()}
    assert got == {s: [[[2, 6 + s]], [[2, 7 + s]]] for s in range(4)}
    for rep in reports:  # stage 1 built for one column too many: both ranks name stages 0 and 1
        assert "stage 0 outputs [float32[2, 7]] but stage 1 expects inputs [float32[2, 8]]" in rep["error"], rep["error"]


def test_torchtitan_style_stages_cut_on_meta(tmp_path) -> None:
    reports = run_ranks(tmp_path, 2, titan_form)
    for rank, rep in enumerate(reports):
        assert rep and all(err < TOL for err in rep.values()), (rank, rep)
    assert sum(k.endswith(" loss") for rep in reports for k in rep) == 5


def test_stages_without_input_args_learn_their_shapes_and_take_keyword_inputs(tmp_path) -> None:
    reports = run_ranks(tmp_path, 2, lazy_form)
    for rank, rep in enumerate(reports):
        assert rep and all(err < TOL for err in rep.values()), (rank, rep)
    assert sum(k.endswith(" out") for rep in reports for k in rep) == 3


def test_learning_shapes_leaves_batch_norm_statistics_alone(tmp_path) -> None:
    assert run_ranks(tmp_path, 2, lazy_side_effects)[0] == 4  # one update per micro-batch, none for the shapes


def test_hand_cut_stages_take_chunk_specs_for_their_inputs(tmp_path) -> None:
    assert max(run_ranks(tmp_path, 2, lazy_specs)) < TOL


def test_a_stage_failing_to_learn_its_shapes_stops_the_others_at_once(tmp_path) -> None:
    (said0, took0), (said1, _) = run_ranks(tmp_path, 2, lazy_mismatch)
    assert said1.startswith("RuntimeError") and "mat1 and mat2 shapes cannot be multiplied" in said1, said1
    assert said0.startswith("PipeAbortedError") and "stopped waiting for the shapes of stage 1" in said0, said0
    assert took0 < 10, took0  # the timeout is 60 s


def test_hand_cut_stages_step_under_autocast(tmp_path) -> None:
    assert max(run_ranks(tmp_path, 2, autocast_steps)) < 1e-6


def test_a_hand_cut_stage_that_changes_its_output_count_is_refused(tmp_path) -> None:
    (first0, then0), (first1, then1) = run_ranks(tmp_path, 2, changed_outputs)
    assert first0 == first1 == "ok"
    assert "StageError" in then0 and "returned 2 output(s), expected 1" in then0, then0
    assert "returned 2 output(s), expected 1" in then1, then1  # the other rank is told why it stopped


def test_a_smaller_batch_after_shapes_were_learned_is_told_so(tmp_path) -> None:
    said0, _ = run_ranks(tmp_path, 2, learned_then_smaller)
    assert "learned" in said0 and "at their first step (built without input_args)" in said0, said0

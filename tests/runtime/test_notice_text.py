"""What the other ranks get of a failure: the whole first paragraph, cut at a word with "…" past the limit."""

from __future__ import annotations

from pippy.runtime.faults import NOTICE_LIMIT, notice_text

LONG = ("1f1b: rank 0, stage 0, splitting the batch (action: step input): input leaf 0 (args[0]): a micro-batch has "
        "shape (2, 9) torch.float32, but the pipeline was traced for (2, 8) torch.float32 (full batch / num_chunks). "
        "Only the feature size differs from the traced one. Shapes are static: use the traced batch size and "
        "micro-batch count, or trace with pipeline(..., dynamic_shapes='auto' or {'<input>': {dim: (lo, hi)}}) so "
        "that sizes may vary. How to fix: make step(target=...) match the model's output.")


def test_a_long_first_line_reaches_the_peers_whole() -> None:
    assert len(LONG) > 300
    assert notice_text(LONG, 0) == LONG


def test_a_cut_ends_at_a_word_and_says_where_the_rest_is() -> None:
    text = notice_text(LONG * 10, 3)
    body, tail = text.split(" … ")
    assert len(body) <= NOTICE_LIMIT and (LONG * 10).startswith(body)
    assert (LONG * 10)[len(body)] == " ", "cut inside a word"
    assert tail == "(cut; the whole message is in rank 3's own error)"


def test_per_rank_lines_are_kept_and_later_paragraphs_flagged() -> None:
    text = notice_text('ranks disagree on schedule:\n  rank 0: "a"\n  rank 1: "b"\nExpected ...\n\nDetails: x', 1)
    assert text.startswith('ranks disagree on schedule: rank 0: "a"; rank 1: "b"; Expected ...')
    assert text.endswith("… (cut; the whole message is in rank 1's own error)")

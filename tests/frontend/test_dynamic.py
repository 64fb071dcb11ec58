"""pipeline(dynamic_shapes=...): the forms it accepts, what the pipe records, and the errors for bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

from pippy import PipeTraceError, SplitPoint, pipeline
from pippy.frontend.dynamic import SymDim, check_dims, export_dynamic_shapes


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * mask.unsqueeze(-1))


def test_forms_turn_into_torch_export_specs() -> None:
    m, x, mask = TwoInputs(), torch.randn(3, 5, 8), torch.ones(3, 5)
    auto = export_dynamic_shapes(m, (x, mask), {}, "auto")
    assert auto == {"x": {0: Dim.AUTO, 1: Dim.AUTO, 2: Dim.AUTO}, "mask": {0: Dim.AUTO, 1: Dim.AUTO}}
    simple = export_dynamic_shapes(m, (x, mask), {}, {"x": {1: (2, 64), -3: None}})
    assert set(simple["x"]) == {0, 1} and simple["x"][0] is None and simple["x"][1].max == 64
    assert simple["mask"] == {0: Dim.AUTO, 1: Dim.AUTO}  # not named: follows
    seq = Dim("seq", max=32)
    assert export_dynamic_shapes(m, (x, mask), {}, {"x": {1: seq}, "mask": {1: seq}})["mask"] == {1: seq}
    assert export_dynamic_shapes(m, (x, mask), {}, ({1: seq}, {1: seq})) == ({1: seq}, {1: seq})  # export's tuple form


@pytest.mark.parametrize(("spec", "match"), [
    ({"y": {1: (2, 8)}}, r"names \['y'\], which are not inputs of TwoInputs.forward; its inputs .*\['mask', 'x'\]"),
    ({"x": {3: (2, 8)}}, r"names dimension 3, but the example x has 3 dimensions \(shape \(3, 5, 8\)\); use 0..2"),
    ({"x": {1: (8, 64)}}, r"is the range 8..64, but the example micro-batch has size 5 there"),
])
def test_bad_specs_say_what_to_change(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pipeline(TwoInputs(), 1, (torch.randn(3, 5, 8), torch.ones(3, 5)), dynamic_shapes=spec)


def test_the_pipe_records_ranges_and_shows_varying_edges() -> None:
    pipe = pipeline(TwoInputs(), 2, (torch.randn(4, 5, 8), torch.ones(4, 5)), split_spec={"a": SplitPoint.END},
                    dynamic_shapes={"x": {0: (2, 16), 1: (2, 64)}})
    assert pipe.input_dims is not None
    x_dims, mask_dims = pipe.input_dims
    assert isinstance(x_dims[1], SymDim) and (x_dims[1].lo, x_dims[1].hi) == (2, 64) and x_dims[2] == 8
    assert mask_dims[1] == x_dims[1]  # the mask follows x's length: one symbol
    assert "float32[?, ?, 8]" in str(pipe)
    static = pipeline(TwoInputs(), 2, (torch.randn(4, 5, 8), torch.ones(4, 5)), split_spec={"a": SplitPoint.END})
    assert static.input_dims is None and "float32[2, 5, 8]" in str(static)
    with pytest.raises(ValueError, match=r"has shape \(2, 6, 8\).*traced for \(2, 5, 8\).*dynamic_shapes="):
        static.split_inputs((torch.randn(4, 6, 8), torch.ones(4, 6)), {}, 2)


def test_a_pipe_where_nothing_varies_stays_static() -> None:
    pipe = pipeline(nn.Linear(8, 2), 2, (torch.randn(4, 8),), dynamic_shapes={"input": {1: None}})
    assert pipe.input_dims is None


def test_dims_the_model_ties_together_get_a_hint() -> None:
    with pytest.raises(PipeTraceError, match=r"(?s)Constraints violated.*one torch.export.Dim.*dynamic_shapes='auto'"):
        pipeline(TwoInputs(), 1, (torch.randn(3, 5, 8), torch.ones(3, 5)),
                 dynamic_shapes={"x": {1: (2, 64)}, "mask": {1: (2, 64)}})


def test_check_dims_names_the_dimension_and_range() -> None:
    want = (2, SymDim("s0", 2, 16))
    bound: dict[str, tuple[int, str]] = {}
    check_dims("ids", torch.ones(2, 7), want, bound)
    assert bound == {"s0": (7, "ids dimension 1")}
    with pytest.raises(ValueError, match=r"mask: dimension 1 is 8, but ids dimension 1 is 7"):
        check_dims("mask", torch.ones(2, 8), want, bound)
    with pytest.raises(ValueError, match=r"has 1 dimensions \(shape \(2,\)\), traced with 2"):
        check_dims("ids", torch.ones(2), want, {})

"""runtime_form (what the runtime executes) and the pure ZB-V generator with its two orders."""

from __future__ import annotations

import ast
import inspect

import pytest

from pippy.schedules import Kind, lower, make_schedule, runtime_form, validate, zbv, zero_bubble
from pippy.schedules.lower import defer_gradless_backward, fuse_adjacent_iw


@pytest.mark.parametrize(("name", "p", "m"), [("zbv", 2, 4), ("zbv", 3, 7), ("zb_h1", 4, 5), ("zb_h2", 3, 6),
                                             ("dualpipev", 2, 4), ("1f1b", 3, 4)])
def test_runtime_form_is_defer_then_fuse(name: str, p: int, m: int) -> None:
    sch = make_schedule(name, p, m)
    rt = runtime_form(sch)
    assert rt == fuse_adjacent_iw(defer_gradless_backward(sch, (0,)))
    assert runtime_form(sch, [0, 1]) == fuse_adjacent_iw(defer_gradless_backward(sch, [0, 1]))
    assert runtime_form(sch, ()) == fuse_adjacent_iw(sch)
    validate(rt)
    validate(lower(rt))
    # stage 0 (reads only the model's inputs by default) runs whole backwards only
    assert not any(a.stage == 0 and a.kind in (Kind.I, Kind.W) for r in rt.actions for a in r)


def test_runtime_form_without_fuse_is_an_unchanged_copy() -> None:
    sch = make_schedule("zb_h1", 2, 3)
    same = runtime_form(sch, fuse=False)
    assert same == sch and same is not sch and same.actions is not sch.actions
    same.actions[0].clear()
    assert sch.actions[0]  # the copy owns its lists


def test_zbv_orders() -> None:
    whole, split = zbv(3, 8, "whole"), zbv(3, 8, "split")
    assert zbv(3, 8) == whole == make_schedule("zbv", 3, 8) and make_schedule("zbv", 3, 8, order="split") == split
    assert whole != split
    for s in (whole, split):
        validate(s)
        assert s.name == "zbv" and s.uses_split_backward()


@pytest.mark.parametrize("order", ["fused", "", None, 1.5])
def test_zbv_bad_order(order: object) -> None:
    with pytest.raises(ValueError, match=r"zbv: got order=.*requires order 'whole' or 'split'.*zbv_for_costs"):
        zbv(2, 4, order)  # type: ignore[arg-type]


def test_make_schedule_refuses_costs() -> None:
    with pytest.raises(ValueError, match=r"takes? no costs.*pippy\.sim\.choose\.zbv_for_costs"):
        make_schedule("zbv", 2, 4, costs=None)


def test_zero_bubble_does_not_import_the_simulator() -> None:
    tree = ast.parse(inspect.getsource(zero_bubble))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("pippy.sim")]

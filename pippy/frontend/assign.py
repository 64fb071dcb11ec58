"""Which stage each traced node goes to: from ``pipe_split()`` markers or a split policy.

    >>> import torch
    >>> from pippy.frontend.trace import export_module
    >>> gm = export_module(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()), (torch.ones(1, 2),)).module()
    >>> def cut_after_linear(gm):  # a PiPPy-style policy: insert the marker op, return the graph
    ...     node = next(v for v in gm.graph.nodes if v.name == "linear")
    ...     with gm.graph.inserting_after(node):
    ...         gm.graph.call_function(torch.ops.pippy.pipe_split.default, (), {})
    ...     return gm
    >>> {v.name: s for v, s in assign_stages(gm, [], cut_after_linear, [])[1].items() if v.op == "call_function"}
    {'linear': 0, 'relu': 1}
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import fx

from pippy.frontend.notice import warn_user
from pippy.frontend.split import assign_by_markers
from pippy.frontend.trace import PipeTraceError, is_split_marker, split_site

__all__ = ["SplitPolicy", "assign_stages"]

SplitPolicy = Callable[..., Any]
"""``policy(gm, example_inputs) -> {node: stage}`` (pippy's: the traced graph and one micro-batch of flat example
inputs, in placeholder order, to a stage for every compute node; see pippy.frontend.policies), or ``policy(gm) -> gm``
inserting split markers (PiPPy's)."""


def assign_stages(
    gm: fx.GraphModule, leaves: Sequence[Any], split_policy: SplitPolicy | None, sites: list[str]
) -> tuple[fx.GraphModule, dict[fx.Node, int]]:
    """The graph to split (a PiPPy-style policy may return a new one) and the stage of each compute node.

    ``sites`` are the user's traced split points, for messages.
    """
    if split_policy is not None and not callable(split_policy):
        raise TypeError(f"split_policy must be a function such as autosplit(4) or split_into_equal_size(4) (from "
                        f"pippy), got {split_policy!r}")
    if split_policy is None:
        assignment = assign_by_markers(gm)
        _check_no_empty_stage(gm, assignment, sites)
        return gm, assignment
    if _takes_graph_only(split_policy):
        before = sum(1 for v in gm.graph.nodes if is_split_marker(v))
        out = split_policy(gm)
        graph = out if isinstance(out, fx.GraphModule) else gm
        new_sites = [split_site(v) for v in graph.graph.nodes if is_split_marker(v)]
        assignment = assign_by_markers(graph)
        _check_no_empty_stage(graph, assignment, new_sites if len(new_sites) != before else sites)
        return graph, assignment
    if sites:
        _refuse_markers_with_policy(sites, split_policy)
    assignment = dict(split_policy(gm, leaves))
    _check_policy_stages(assignment, split_policy)
    return gm, assignment


def _refuse_markers_with_policy(sites: list[str], policy: SplitPolicy) -> None:
    """Refuse split points (``split_spec``, ``pipe_split()``) next to a policy that chooses every cut itself."""
    where = list(dict.fromkeys(sites))
    raise PipeTraceError(
        f"pipeline(): both split points ({'; '.join(where[:3])}{' ...' if len(where) > 3 else ''}) and "
        f"split_policy={policy!r} were given. The policy chooses every cut itself, so the split points would be "
        "ignored. How to fix: pass one of them: drop split_policy to cut at the split points, or drop split_spec "
        "(and remove the pipe_split() calls from forward) to let the policy choose"
    )


def _check_policy_stages(assignment: Mapping[fx.Node, int], policy: SplitPolicy) -> None:
    """Refuse a policy's split that gives no node to some stage (that stage would only pass values on)."""
    used = set(assignment.values())
    n = max(used, default=0) + 1
    empty = [s for s in range(n) if s not in used]
    if empty:
        raise PipeTraceError(
            f"stage {empty[0]} of {n} would be empty: split_policy={policy!r} gives no operation to stage"
            f"{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))}. Expected at least one operation in every "
            "stage (an empty stage only passes values on). How to fix: number the stages 0..n-1 without gaps (for "
            "split_by_names: give each stage number at least one node), or ask the policy for fewer stages"
        )


def _takes_graph_only(policy: SplitPolicy) -> bool:
    """True for a one-argument policy ``fn(gm) -> gm`` (PiPPy's form)."""
    try:
        params = list(inspect.signature(policy).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 1  # fn(gm); fn(gm, example_inputs) and fn(gm, n=2) take the inputs second


def _check_no_empty_stage(gm: fx.GraphModule, assignment: Mapping[fx.Node, int], sites: list[str]) -> None:
    """Refuse a stage with no computation between two split points (it would only pass values on)."""
    if not sites:
        return
    used = set(assignment.values())
    n = max(used, default=0) + 1
    for s in range(n):
        if s in used:
            continue
        if s == 0:
            where = f"the split point {sites[0]} comes before any computation"
            fix = "remove that split point (a pipe_split() at the very start of forward, or SplitPoint.BEGINNING of " \
                "the first module)"
        else:
            where = f"nothing is computed between the split points {sites[s - 1]} and {sites[s]}"
            fix = "remove one of the two (two pipe_split() calls in a row, or a split_spec marking both the END of " \
                "one module and the BEGINNING of the next)"
        raise PipeTraceError(
            f"stage {s} of {n} would be empty: {where}. Expected at least one operation in every stage. "
            f"How to fix: {fix}"
        )
    if len(sites) >= n:  # split points after the last computation: no stage follows them
        late = sites[n - 1:]
        warn_user(
            f"pipeline(): the split point{'s' if len(late) > 1 else ''} {', '.join(late)} come"
            f"{'' if len(late) > 1 else 's'} after the last computation of forward, so no stage follows "
            f"{'them' if len(late) > 1 else 'it'}: the pipe has {n} stage{'s' if n > 1 else ''} for {len(sites)} split "
            f"point{'s' if len(sites) > 1 else ''}. To get {len(sites) + 1} stages, move "
            f"{'them' if len(late) > 1 else 'it'} earlier (e.g. SplitPoint.END of an earlier module)",
        )

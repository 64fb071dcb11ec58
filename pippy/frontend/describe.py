"""How a split pipe reads to a person: ``print(pipe)`` and where its stage boundaries came from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch.utils._pytree as pytree

from pippy.frontend.split import USER

if TYPE_CHECKING:
    from pippy.frontend.pipe import SplitPipe

__all__ = ["describe_pipe", "describe_split_sites", "none_output_notice", "repeated_site", "returns_none"]


def returns_none(pipe: Any) -> bool:
    """Whether the model's forward returned None when traced (its last stage returns nothing).

        >>> import torch, warnings
        >>> from pippy import pipeline
        >>> class Silent(torch.nn.Linear):
        ...     def forward(self, x: torch.Tensor) -> None:
        ...         super().forward(x)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # pipeline() warns about it (none_output_notice)
        ...     silent = pipeline(Silent(3, 1), 2, (torch.ones(4, 3),))
        >>> returns_none(silent), returns_none(pipeline(torch.nn.Linear(3, 1), 2, (torch.ones(4, 3),)))
        (True, False)
    """
    module = pipe.stage_infos[-1].module
    graph = getattr(module, "graph", None)
    if graph is None:
        return False
    out = next((n for n in graph.nodes if n.op == "output"), None)
    leaves = pytree.tree_leaves(out.args[0]) if out is not None else [0]
    if any(x is not None for x in leaves):
        return False
    try:
        return pytree.tree_unflatten([None] * pipe.out_spec.num_leaves, pipe.out_spec) is None
    except Exception:  # an output spec of another kind: not a plain None
        return False


def none_output_notice(model_name: str) -> str:
    """The warning of ``pipeline()`` for a model whose forward returns None.

        >>> none_output_notice("Net")[:62]
        "pipeline(Net): the model's forward returns None, so the pipe h"
    """
    return (f"pipeline({model_name}): the model's forward returns None, so the pipe has no output: step() has "
            "nothing to train on (loss_fn would get None) and eval() returns None. How to fix: return the output "
            "(or the loss) at the end of forward, e.g. `return self.head(h)`, and trace again")


def repeated_site(site: str, n: int) -> str:
    """Why one split point made ``n`` cuts: a module called ``n`` times, or a ``pipe_split()`` in a loop.

        >>> repeated_site("SplitPoint.END of 'a' (split_spec / annotate_split_points)", 2)
        'traced 2 times: forward calls the module 2 times and each call is cut; to cut once, name a module called once (or split with pipe_split() in forward)'
    """
    if "split_spec" in site:
        return (f"traced {n} times: forward calls the module {n} times and each call is cut; to cut once, name a "
                "module called once (or split with pipe_split() in forward)")
    return (f"traced {n} times: it runs in a loop, one split point per pass; if fewer were meant, guard it with an if "
            "or move it out of the loop")


def describe_split_sites(sites: Sequence[str] | None, num_stages: int) -> str:
    """Where a pipe's stage boundaries came from, for messages about its stage count.

    ``sites`` is :attr:`SplitPipe.split_sites`: a split point traced several times (a ``pipe_split()``
    inside a loop) is named once, with its count.

        >>> describe_split_sites(["model.py:9 in forward: pipe_split()"] * 3, 4)
        'its 4 stages come from the split points model.py:9 in forward: pipe_split() (traced 3 times: it runs in a loop, one split point per pass; if fewer were meant, guard it with an if or move it out of the loop)'
        >>> describe_split_sites([], 1)
        'the model has no split point (no pipe_split() in forward, no split_spec, no split_policy), so it is one stage; add split points'
    """
    if sites is None:
        return f"its {num_stages} stages come from the split_policy passed to pipeline()"
    if not sites:
        return (
            "the model has no split point (no pipe_split() in forward, no split_spec, no split_policy), so it is one "
            "stage; add split points"
        )
    counts: dict[str, int] = {}
    for site in sites:
        counts[site] = counts.get(site, 0) + 1
    parts = [site if n == 1 else f"{site} ({repeated_site(site, n)})" for site, n in counts.items()]
    text = f"its {num_stages} stages come from the split points {'; '.join(parts)}"
    trailing = len(sites) - (num_stages - 1)
    if trailing > 0:
        text += (
            f"; the last {trailing} of them come after the last computation of forward and make no stage"
            if trailing > 1 else "; the last of them comes after the last computation of forward and makes no stage"
        )
    return text


def describe_pipe(pipe: SplitPipe) -> str:
    """``print(pipe)``: the stages as a ``forward`` calling ``submod_i``, then every edge (``?``: a size that varies).

        >>> import torch
        >>> from pippy import pipeline
        >>> print(pipeline(torch.nn.Linear(2, 2), 1, (torch.ones(1, 2),)))
        Pipe(Linear: 1 stages, 1 chunks)
        def forward(self, in0):
            (s0_0,) = self.submod_0(in0)  # 6 params
            return unflatten((s0_0,))
        edges:
    """
    lines = [f"Pipe({pipe.model_name}: {pipe.num_stages} stages, {pipe.num_chunks} chunks)"]
    names: dict[tuple[int, int], str] = {}
    user = [f"in{k}" for k in range(len(pipe.example_leaves))]
    lines.append(f"def forward(self, {', '.join(user)}):")
    for info in pipe.stage_infos:
        args = []
        for ref in info.inputs:
            args.append(user[ref.index] if ref.src_stage == USER else names[(ref.src_stage, ref.index)])
        outs = []
        for j, _ in enumerate(info.outputs):
            names[(info.index, j)] = f"s{info.index}_{j}"
            outs.append(names[(info.index, j)])
        n_params = sum(p.numel() for p in info.module.parameters())
        target = ", ".join(outs) if outs else "_"
        lines.append(f"    ({target},) = self.submod_{info.index}({', '.join(args)})  # {n_params:,} params")
    last = pipe.stage_infos[-1]
    if returns_none(pipe):  # the last stage computes for nothing: the model returns None
        lines[-1] = lines[-1].replace(f"({names[(last.index, 0)]},) = ", "", 1) if last.outputs else lines[-1]
        lines.append("    return None  # the model's forward returns None")
    else:
        lines.append(f"    return unflatten(({', '.join(names[(last.index, j)] for j in range(len(last.outputs)))},))")
    lines.append("edges:")
    for info in pipe.stage_infos:
        for j, cons in enumerate(info.consumers):
            meta = info.outputs[j]
            grad = " +grad" if meta.requires_grad else ""
            for dst, _ in cons:
                skip = " (skip)" if dst > info.index + 1 else ""
                lines.append(f"  submod_{info.index} -> submod_{dst}: {info.output_names[j]} {meta.describe()}{grad}{skip}")
    for sp in pipe.shared:
        lines.append(f"  shared: {', '.join(f'submod_{s}.{f}' for s, f in sp.uses)}")
    return "\n".join(lines)

"""``split_report(pipe)``: a table of each stage's cost, parameter bytes and the bytes it sends to other stages.

    >>> import torch, pippy
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> pipe = pippy.pipeline(net, 2, example_args=(torch.randn(4, 4),), split_spec={"0": pippy.SplitPoint.END})
    >>> print(pipe.split_report())
    stage  cost (flops)  share  params  sends (per micro-batch)
    0      64 FLOP       50.0%  80 B    ->1 32 B
    1      64 FLOP       50.0%  80 B    -
    bottleneck: stage 0 at 64 FLOP (1.00x the even share); sent between stages: 32 B per micro-batch

The cost column is what the split policy balanced (recorded in each node's meta); for a pipe
split by markers, as here, it is the FLOPs estimated from the traced shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pippy.frontend.costs import COMPUTE_OPS, COST_META, TAIL_META, node_flops, value_nbytes

if TYPE_CHECKING:  # pipe.py imports this module (for Pipe.split_report)
    from pippy.frontend.pipe import SplitPipe

__all__ = ["split_report", "stage_costs"]


def _size(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"


def _cost(kind: str, c: float) -> str:
    if kind == "time":
        return f"{c * 1e3:.3f} ms"
    if kind == "params":
        return _size(c)
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if c >= scale:
            return f"{c / scale:.2f} {unit}"
    return f"{c:.0f} FLOP"


def stage_costs(pipe: SplitPipe) -> tuple[str, list[float]]:
    """``(kind, per-stage cost)``: what the policy recorded, else estimated forward FLOPs.

        >>> import torch, pippy
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
        >>> x = torch.randn(4, 4)
        >>> stage_costs(pippy.pipeline(net, 2, (x,), split_spec={"0": pippy.SplitPoint.END}))  # estimated
        ('flops', [64.0, 72.0])
        >>> stage_costs(pippy.pipeline(net, 2, (x,), split_policy=pippy.split_equal_params(2)))  # recorded
        ('params', [80.0, 80.0])
    """
    recorded = True
    kinds: set[str] = set()
    costs: list[float] = []
    tail = 0.0
    for info in pipe.stage_infos:
        total = 0.0
        for node in info.module.graph.nodes:
            if node.op not in COMPUTE_OPS:
                continue
            meta = node.meta.get(COST_META)
            if meta is None:
                recorded = False
            else:
                kinds.add(str(meta[0]))
                total += float(meta[1])
                tail = float(node.meta.get(TAIL_META, 0.0))
        costs.append(total)
    if recorded and len(kinds) == 1:
        if costs:
            costs[-1] += tail  # the loss the last stage computes (see GraphCosts.tail)
        return kinds.pop(), costs
    flops = [
        sum(node_flops(n) for n in info.module.graph.nodes if n.op in COMPUTE_OPS) for info in pipe.stage_infos
    ]
    return "flops", flops


def split_report(pipe: SplitPipe) -> str:
    """Each stage's cost (and share of the total), parameter bytes, and bytes sent to each other stage.

    Bytes are per micro-batch; a value read by two later stages is counted once for each.

        >>> import torch, pippy
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> pipe = pippy.pipeline(net, 2, (torch.randn(4, 4),), split_policy=pippy.autosplit(2, cost="params"))
        >>> print(split_report(pipe).splitlines()[-1])
        bottleneck: stage 0 at 160 B (1.05x the even share); sent between stages: 64 B per micro-batch
    """
    kind, costs = stage_costs(pipe)
    total = sum(costs) or 1.0
    rows = [("stage", f"cost ({kind})", "share", "params", "sends (per micro-batch)")]
    sent_total = 0
    for info, c in zip(pipe.stage_infos, costs):
        seen: set[int] = set()
        pbytes = 0
        for p in info.module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                pbytes += value_nbytes(p)
        to: dict[int, int] = {}
        for meta, cons in zip(info.outputs, info.consumers):
            for dst in sorted({d for d, _ in cons}):
                to[dst] = to.get(dst, 0) + meta.nbytes
        sent_total += sum(to.values())
        sends = ", ".join(f"->{d} {_size(b)}" for d, b in sorted(to.items())) or "-"
        rows.append((str(info.index), _cost(kind, c), f"{100 * c / total:.1f}%", _size(pbytes), sends))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    worst = max(range(len(costs)), key=lambda s: costs[s]) if costs else 0
    ideal = total / max(len(costs), 1)
    lines.append(
        f"bottleneck: stage {worst} at {_cost(kind, costs[worst]) if costs else '-'} "
        f"({costs[worst] / ideal if costs and ideal else 1:.2f}x the even share); "
        f"sent between stages: {_size(sent_total)} per micro-batch"
    )
    return "\n".join(lines)

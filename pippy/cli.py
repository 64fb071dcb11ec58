"""Command line: ``python -m pippy {show,simulate,compare,tune,trace-compare,profile} --help``.

    >>> main(["show", "gpipe", "--ranks", "2", "--microbatches", "2"])  # doctest: +NORMALIZE_WHITESPACE
    step     0   1   2   3
    rank 0 0F0 0F1 0B1 0B0
    rank 1 1F0 1F1 1B1 1B0
    0
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from pippy.cli_sim import cmd_compare, cmd_simulate, cmd_trace_compare
from pippy.cli_tune import cmd_tune, make_named
from pippy.schedules.generators import SCHEDULES  # pure Python: --help stays free of torch

if TYPE_CHECKING:
    pass

__all__ = ["main", "parse_size"]

_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}


def parse_size(text: str) -> float:
    """Parse a byte size: ``8GiB``, ``512MiB``, ``1e9``, ``2GB`` (decimal), ``4G`` (binary).

        >>> parse_size("8GiB"), parse_size("512MiB"), parse_size("1e9"), parse_size("2GB")
        (8589934592.0, 536870912.0, 1000000000.0, 2000000000.0)
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse size {text!r}: use a number with an optional unit B, KiB, MiB, GiB, TiB, KB, MB, GB, TB")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _schedule_name(text: str) -> str:
    key = text.strip().lower().replace("-", "_")
    if key not in SCHEDULES:
        raise argparse.ArgumentTypeError(f"unknown schedule {text!r}; valid names: {', '.join(SCHEDULES)}")
    return key


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,2,4,8; got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,2,4,8; got {text!r}")
    return vals


def _size(text: str) -> float:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _build_parser() -> _Parser:
    p = _Parser(prog="pippy", description="Pipeline schedules: show, simulate, compare and tune them.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def shape(sp: argparse.ArgumentParser, need_ranks: bool = True) -> None:
        sp.add_argument("--ranks", "-p", type=_positive, required=need_ranks, help="pipeline ranks (devices)")
        sp.add_argument("--microbatches", "-m", type=_positive, required=True, help="micro-batches per step")

    names = ", ".join(SCHEDULES)
    sp = sub.add_parser("show", help="print a schedule as a rank x step grid", description="Print a schedule as a rank x step grid.")
    sp.add_argument("schedule", type=_schedule_name, help=f"one of: {names}")
    shape(sp)
    sp.add_argument("--lowered", action="store_true", help="show the schedule with SEND/RECV actions inserted")

    sp = sub.add_parser("simulate", help="predict one step: timeline, bubble, memory", description="Simulate one training step.")
    sp.add_argument("schedule", type=_schedule_name, help=f"one of: {names}")
    shape(sp)
    sp.add_argument("--costs", help="cost model JSON (default: unit costs F=I=W=1 per rank, B=2; a schedule class "
                    "given no costs= assumes B=1.5, which may place W's elsewhere)")
    sp.add_argument("--png", help="also draw the timeline to this PNG file (needs matplotlib)")
    sp.add_argument("--trace", help="also write a Chrome/Perfetto trace JSON here")
    sp.add_argument("--save-timeline", help="also write the predicted timeline JSON here (for trace-compare)")
    sp.add_argument("--fuse-backward", choices=["true", "false", "auto"], default="true",
                    help="the schedule's fuse_backward= to simulate (default true, the runtime's default; auto: what "
                         "compare shows)")
    sp.add_argument("--no-color", action="store_true", help="plain text without ANSI colours (also when not a terminal)")
    sp.add_argument("--width", type=_positive, default=None, help="timeline width in characters (default: every label fits, in pages of the terminal width)")

    sp = sub.add_parser("compare", help="simulate every schedule side by side", description="Simulate every schedule.")
    shape(sp)
    sp.add_argument("--costs", help="cost model JSON (default: unit costs)")

    sp = sub.add_parser("tune", help="pick schedule and micro-batch count under a memory limit",
                        description="Recommend the fastest schedule and micro-batch count within a memory limit.")
    sp.add_argument("--costs", required=True, help="cost model JSON (e.g. from pippy.sim.profile)")
    sp.add_argument("--memory-limit", type=_size, required=True, help="per-rank limit, e.g. 8GiB, 512MiB, 1e9")
    sp.add_argument("--ranks", "-p", type=_positive, help="pipeline ranks (default: stages in the cost model)")
    sp.add_argument("--microbatches-choices", type=_int_list, default=[1, 2, 4, 8, 16, 32, 64],
                    help="micro-batch counts to try, comma separated (default 1,2,4,...,64)")
    sp.add_argument("--synthesize", action="store_true",
                    help="also build a schedule for these costs and limit (list scheduling judged by the simulator)")
    sp.add_argument("--save-csv", help="with --synthesize: write the synthesized schedule here (ScheduleFromCSV runs it)")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr while synthesizing")

    sp = sub.add_parser("trace-compare", help="predicted vs measured timeline table",
                        description="Compare two timelines (predicted, measured): timeline JSON or Chrome trace JSON.")
    sp.add_argument("predicted", help="timeline JSON (simulate --save-timeline) or Chrome trace")
    sp.add_argument("measured", help="trace of a real run: Chrome JSON from trace='run.json' / PIPPY_TRACE, or timeline JSON")
    sp.add_argument("--per-action", action="store_true", help="also compare the median time of each stage's F/B/I/W")

    sp = sub.add_parser("profile", help="measure per-stage costs (demo model, or how to profile yours)",
                        description="Without --demo: print how to profile your own model with pippy.sim.profile. "
                                    "With --demo mlp: profile a built-in residual MLP in this process.")
    sp.add_argument("--demo", choices=["mlp"], help="profile a built-in model (needs torch)")
    sp.add_argument("--stages", type=_positive, default=2, help="stages to cut the demo model into (default 2)")
    sp.add_argument("--microbatches", "-m", type=_positive, default=4, help="micro-batches per step (default 4)")
    sp.add_argument("--threads", type=_positive, default=1, help="torch threads while timing (default 1)")
    sp.add_argument("--repeats", type=_positive, default=3, help="timed runs per stage (default 3)")
    sp.add_argument("--split-backward", action="store_true",
                    help="ignored (kept for old scripts): F/B and tapped F/I/W are always both timed")
    sp.add_argument("--out", "-o", help="write the cost model JSON here (for simulate/compare/tune --costs)")
    return p


def _cmd_show(a: argparse.Namespace) -> int:
    from pippy.schedules.render_grid import grid

    sch = make_named(a.schedule, a.ranks, a.microbatches)
    if a.lowered:
        from pippy.schedules.lower import lower

        sch = lower(sch)
    print(grid(sch))
    return 0


_PROFILE_HOWTO = """\
Profile your own model (in Python, with the thread count of the run):

    from pippy import pipeline
    from pippy.sim.profile import profile
    pipe = pipeline(model, n_microbatches, example_args=(x,))
    costs = profile(pipe, (x,), loss_fn=loss_fn, target=y, threads=1)   # F, B and split F/I/W
    costs.to_json("costs.json")

Under torchrun, pippy.sim.profile.profile_ranks(pipe, (x,), placement, ...) times each rank's stages
on that rank and adds the measured link latency and bandwidth. Then:

    python -m pippy compare -p 2 -m 8 --costs costs.json
    python -m pippy simulate 1f1b -p 2 -m 8 --costs costs.json --save-timeline pred.json
    python -m pippy trace-compare pred.json run.json     # run.json: trace="run.json" of a real step

Try it on a built-in model: python -m pippy profile --demo mlp -o costs.json"""


def _cmd_profile(a: argparse.Namespace) -> int:
    if a.demo is None:
        print(_PROFILE_HOWTO)
        return 0
    import torch

    from pippy import SplitPoint, pipeline
    from pippy.sim.profile import profile
    from pippy.sim.render import format_bytes, format_time

    torch.manual_seed(0)
    d, h, per = 256, 1024, 2
    layers: list[torch.nn.Module] = []
    for _ in range(a.stages * per):
        layers += [torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, d)]
    model = torch.nn.Sequential(*layers)
    x, y = torch.randn(8 * a.microbatches, d), torch.randn(8 * a.microbatches, d)
    spec = {str(3 * per * k): SplitPoint.BEGINNING for k in range(1, a.stages)}
    pipe = pipeline(model, a.microbatches, example_args=(x,), split_spec=spec)
    costs = profile(pipe, (x,), loss_fn=torch.nn.functional.mse_loss, target=y, threads=a.threads,
                    repeats=a.repeats)
    print(f"demo MLP ({a.stages * per} blocks of Linear({d},{h})-ReLU-Linear({h},{d}), batch {len(x)}), "
          f"{a.stages} stages, {a.microbatches} micro-batches, {a.threads} thread(s); per micro-batch:")
    print(f"{'stage':>5} {'F':>9} {'B':>9} {'F split':>9} {'I':>9} {'W':>9} {'activations':>12} {'sent':>9}")
    for s, c in enumerate(costs.stages):
        print(f"{s:>5} {format_time(c.f):>9} {format_time(c.b):>9} {format_time(c.forward_time(True)):>9} "
              f"{format_time(c.i):>9} {format_time(c.w):>9} {format_bytes(c.act_bytes):>12} {format_bytes(c.send_bytes):>9}")
    if a.out:
        costs.to_json(a.out)
        print(f"wrote {a.out}")
    return 0


_COMMANDS = {"show": _cmd_show, "simulate": cmd_simulate, "compare": cmd_compare, "tune": cmd_tune,
             "trace-compare": cmd_trace_compare, "profile": _cmd_profile}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a bad argument).

    A bad argument prints ``pippy show: error: argument schedule: unknown schedule 'nope'; valid
    names: gpipe, 1f1b, ...`` on stderr:

        >>> main(["show", "nope", "-p", "2", "-m", "2"])
        2
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:
        return int(e.code or 0)
    if _other_launched_rank(args.command):
        return 0
    try:
        rc = _COMMANDS[args.command](args)
        sys.stdout.flush()  # a broken pipe shows here, not at exit
        return rc
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as CLI tools do
        _quiet_stdout()
        return 0
    except (ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"pippy {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _other_launched_rank(command: str) -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1) only rank 0 runs a command (each is one process's work); True elsewhere.

    Otherwise every rank would print the same output, time its profile against the others' and
    write the same ``-o`` file at once. Rank 0 says so on stderr.
    """
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return False
    if world <= 1:
        return False
    if rank == 0:
        print(f"pippy {command}: launched on {world} ranks, but this command runs in one process: rank 0 runs it, "
              f"ranks 1..{world - 1} do nothing. Run it with plain python (python -m pippy {command} ...)",
              file=sys.stderr)
    return rank != 0


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing at exit after a broken pipe prints nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured): nothing to flush
        pass

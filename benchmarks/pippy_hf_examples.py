"""Run PiPPy's own Hugging Face example scripts, unchanged, against this pippy with shrunk configs on CPU.

Run:  .venv/bin/python benchmarks/pippy_hf_examples.py [--examples-dir DIR] [--timeout 300] [--ranks N]
      [--logdir DIR] [--verbose] [NAME ...]
      .venv/bin/python benchmarks/pippy_hf_examples.py --list

The scripts (PiPPy's examples/huggingface/pippy_*.py plus hf_utils.py, the last version written
against the ``pippy`` package, i.e. the parent of PiPPy commit 395801c9; get them with
``git -C PiPPy archive 395801c9^ examples/huggingface | tar -x -C /tmp/pex``; they are not shipped
here) build a default config with random weights, trace with
``pippy.pipeline``, build a ``PipelineStage`` and run one ``ScheduleGPipe`` step. Each runs under
``torchrun`` on CPU/gloo, 2 ranks unless its split points fix another stage count, through a
bootstrap (this file again) that, before running the script with ``runpy``:

* shrinks every ``transformers`` config right after its own ``__init__``: the init is run again
  with width 64 (other widths scaled alike, 16 at least), FFN sizes 128, 4 heads, 2 layers and a
  1024-token vocabulary (special token ids stay valid), so derived fields stay consistent; what
  the script sets afterwards (``config.num_hidden_layers = 3``) still wins;
* blocks ``from_pretrained`` (and runs with the Hugging Face hubs offline and pip without an index):
  an example that downloads a tokenizer or weights is reported ``offline``, not run.

Script arguments are passed only where the script offers them (``--batch_size 4 --cuda 0``, GPT-2's
``--n_embd/--n_layer/--n_head``). Results: ``pass``, ``FAIL`` (cause: first line of the error of the
rank that raised first), ``skip`` (an optional package such as diffusers is not installed) or
``offline``. The exit status is 1 when any example FAILs.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path(os.environ.get("PIPPY_HF_EXAMPLES", "/tmp/pex/examples/huggingface"))
BOOT_ENV, ERR_ENV = "PIPPY_HF_BOOTSTRAP", "PIPPY_HF_ERRDIR"
OFFLINE = "download blocked"
# Split points that fix the stage count (the scripts assert num_stages == world size):
# albert splits at each of its num_hidden_layers = 3 layer calls (4 stages); convBert,
# layoutLM and plBart put embeddings and head on ranks of their own (3 at least); m2m100 has 3.
NPROC = {"pippy_albert": 4, "pippy_convBert": 3, "pippy_layoutLM": 3, "pippy_plBart": 3, "pippy_m2m100": 3}
SCRIPT_ARGS = {"--batch_size": "4", "--cuda": "0", "--n_embd": "64", "--n_layer": "2", "--n_head": "4"}
MAIN_WIDTH = ("hidden_size", "d_model", "n_embd", "dim")  # the others scale with it (MobileBERT keeps 4:1)
WIDTH = ("embedding_size", "word_embed_proj_dim", "intra_bottleneck_size", "pooler_hidden_size", "true_hidden_size")
FFN = ("intermediate_size", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_dim", "d_ff", "d_inner", "hidden_dim")
HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads", "decoder_attention_heads")
LAYERS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_decoder_layers", "encoder_layers",
          "decoder_layers")  # fmt: skip
SMALL = [(FFN, 128), (HEADS, 4), (LAYERS, 2), (("d_kv", "d_head"), 16)]
WIDE = 64


# ---------------------------------------------------------------- bootstrap (runs inside each rank)


def small_kwargs(config: Any) -> dict[str, Any]:
    """The config fields to pass again to its ``__init__`` so that the model is tiny (never larger)."""
    fields = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    out: dict[str, Any] = {}
    main = next((fields[k] for k in MAIN_WIDTH if type(fields.get(k)) is int), 0)
    if main > WIDE:
        out.update({k: WIDE for k in MAIN_WIDTH if fields.get(k) == main})
        scaled = {k: max(16, fields[k] * WIDE // main) for k in WIDTH if type(fields.get(k)) is int}
        out.update({k: v for k, v in scaled.items() if v < fields[k]})
    for names, size in SMALL:
        out.update({k: size for k in names if type(fields.get(k)) is int and fields[k] > size})
    if "attention_types" in fields and "num_layers" in out:  # GPT-Neo: one (global, local) pair per 2 layers
        out["attention_types"] = [[["global", "local"], out["num_layers"] // 2]]
    if type(fields.get("vocab_size")) is int and fields["vocab_size"] > 1024:  # keep special token ids valid
        ids = [v for k, v in fields.items() if k.endswith("token_id") and type(v) is int]
        out["vocab_size"] = min(fields["vocab_size"], max(1024, 1 + max(ids, default=0)))
    return out


def install_shrink() -> None:
    """Make every ``transformers`` config re-run its own ``__init__`` with :func:`small_kwargs` once built."""
    import transformers

    base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
    depth = [0]

    def wrap(init: Any) -> Any:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            depth[0] += 1
            try:
                init(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0 and (small := small_kwargs(self)):  # outermost init only (4.x calls super().__init__)
                depth[0] += 1
                try:
                    init(self, *args, **{**kwargs, **small})
                finally:
                    depth[0] -= 1

        __init__._shrinks = True  # type: ignore[attr-defined]
        return __init__

    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        if not getattr(cls.__init__, "_shrinks", False):  # wrap the concrete class on its first instance
            cls.__init__ = wrap(cls.__init__)  # type: ignore[misc]
        return object.__new__(cls)

    base.__new__ = __new__


def block_downloads(source: str) -> None:
    """Replace ``from_pretrained`` of the model, config and tokenizer bases by an error naming the download."""

    def blocked(cls: type, name: Any = None, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{OFFLINE}: {cls.__name__}.from_pretrained({name!r}) would download files")

    import transformers

    bases = [transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase, transformers.AutoConfig,
             getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig]  # fmt: skip
    if "diffusers" in source and importlib.util.find_spec("diffusers"):
        import diffusers

        bases += [diffusers.ModelMixin, diffusers.ConfigMixin, diffusers.DiffusionPipeline]
    for b in bases:
        b.from_pretrained = classmethod(blocked)  # type: ignore[method-assign,assignment]


def record_error(exc: BaseException) -> None:
    """Write this rank's error (time, first line, innermost pippy/script frame, traceback) for the runner."""
    errdir = os.environ.get(ERR_ENV)
    if not errdir:
        return
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/pippy/" in f.filename or Path(f.filename).name == Path(sys.argv[0]).name] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} in {ours[-1].name}" if ours else "?"
    first = (str(exc).strip().splitlines() or [""])[0]
    rank = os.environ.get("RANK", "?")
    rec = {"time": time.time(), "rank": rank, "cause": f"{type(exc).__name__}: {first}", "where": where,
           "traceback": "".join(traceback.format_exception(exc))}  # fmt: skip
    Path(errdir, f"rank{rank}.json").write_text(json.dumps(rec))


def bootstrap(script: str, args: list[str]) -> None:
    """Run ``script`` as ``__main__`` with ``args``, configs shrunk and downloads blocked."""
    import runpy

    source = Path(script).read_text()
    try:
        install_shrink()
        block_downloads(source)
        sys.argv = [script, *args]
        sys.path.insert(0, str(Path(script).parent))
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            record_error(e)
        raise
    except BaseException as e:
        record_error(e)
        raise


# ---------------------------------------------------------------- runner


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def describe(script: Path) -> dict[str, Any]:
    """Model class, ranks, arguments and missing optional packages of one example script."""
    source = script.read_text()
    model = re.search(r"model_class = (\w+)|from diffusers import (\w+)", source)
    tops = {a.name.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    tops |= {n.module.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.module}
    local = {p.stem for p in script.parent.glob("*.py")}
    missing = sorted(m for m in tops - local if importlib.util.find_spec(m) is None)
    args = [x for k, v in SCRIPT_ARGS.items() if re.search(rf"add_argument\(\s*['\"]{k}['\"]", source) for x in (k, v)]
    return {"model": next((g for g in model.groups() if g), "?") if model else "?", "missing": missing,
            "nproc": NPROC.get(script.stem, 2), "args": args}  # fmt: skip


def run_example(script: Path, info: dict[str, Any], logdir: Path, timeout: float) -> dict[str, Any]:
    """Run one example under torchrun; returns result, cause, where, traceback and seconds."""
    errdir = logdir / f"{script.stem}.errors"
    errdir.mkdir(parents=True, exist_ok=True)
    for old in errdir.glob("*.json"):
        old.unlink()
    env = {**os.environ, BOOT_ENV: str(script), ERR_ENV: str(errdir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PIP_NO_INDEX": "1"}  # fmt: skip
    n = info["nproc"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(Path(__file__).resolve()), *info["args"]]  # fmt: skip
    log = logdir / f"{script.stem}.log"
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            for sig in (signal.SIGTERM, signal.SIGKILL):  # the process group this call started
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
    seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    done = all(f"Rank {r} completes" in text for r in range(n))
    errors = sorted((json.loads(p.read_text()) for p in errdir.glob("*.json")), key=lambda e: e["time"])
    res = {"seconds": seconds, "log": str(log), "cause": "", "where": "", "traceback": ""}
    if rc == 0 and done:
        return {**res, "result": "pass"}
    if errors:
        first = errors[0]
        res.update(cause=f"[rank {first['rank']}] {first['cause']}", where=first["where"], traceback=first["traceback"])
    elif rc is None:
        res["cause"] = f"timed out after {timeout:.0f} s"
    else:
        res["cause"] = f"exit status {rc}" + ("" if done else ", not every rank printed 'Rank N completes'")
    return {**res, "result": "offline" if OFFLINE in res["cause"] else "FAIL"}


def main() -> int:
    """Parse arguments, run the chosen examples one at a time, print the table; 1 if any FAILed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="examples to run (pippy_gpt2, gpt2, ...); default: all")
    p.add_argument("--examples-dir", type=Path, default=DEFAULT_DIR, help="folder of pippy_*.py and hf_utils.py")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per example (default 300)")
    p.add_argument("--logdir", type=Path, default=None, help="where each example's output goes (default: a temp dir)")
    p.add_argument("--ranks", type=int, default=None, help="ranks for every example (default: 2 or as split)")
    p.add_argument("--list", action="store_true", help="list the examples with model class, ranks and arguments")
    p.add_argument("--verbose", action="store_true", help="print the first-raising rank's traceback for failures")
    a = p.parse_args()
    scripts = sorted(a.examples_dir.glob("pippy_*.py"), key=lambda s: s.stem.lower())
    if not scripts:
        p.error(f"no pippy_*.py in {a.examples_dir}")
    wanted = {n.removesuffix(".py").removeprefix("pippy_").lower() for n in a.names}
    unknown = wanted - {s.stem.removeprefix("pippy_").lower() for s in scripts}
    if unknown:
        p.error(f"unknown examples: {', '.join(sorted(unknown))} (see --list)")
    scripts = [s for s in scripts if not wanted or s.stem.removeprefix("pippy_").lower() in wanted]
    infos = {s: describe(s) for s in scripts}
    for i in infos.values():
        i["nproc"] = a.ranks or i["nproc"]
    if a.list:
        for s, i in infos.items():
            extra = f"  (needs {', '.join(i['missing'])})" if i["missing"] else ""
            print(f"{s.stem:22} {i['model']:32} ranks={i['nproc']}  {' '.join(i['args'])}{extra}")
        return 0
    logdir = a.logdir or Path(tempfile.mkdtemp(prefix="pippy_hf_examples_"))
    logdir.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.monotonic()
    print(f"{'example':22} {'model class':32} {'ranks':5} {'result':7} {'cause':90} seconds")
    for s, i in infos.items():
        if i["missing"]:
            r = {"result": "skip", "cause": f"{', '.join(i['missing'])} not installed", "seconds": 0.0}
        else:
            r = run_example(s, i, logdir, a.timeout)
        rows.append((s, r))
        print(f"{s.stem:22} {i['model']:32} {i['nproc']:<5} {r['result']:7} {r['cause'][:90]:90} {r['seconds']:7.1f}",
              flush=True)  # fmt: skip
    failed = [(s, r) for s, r in rows if r["result"] == "FAIL"]
    counts = {k: sum(r["result"] == k for _, r in rows) for k in ("pass", "FAIL", "skip", "offline")}
    print(f"\n{', '.join(f'{v} {k}' for k, v in counts.items())} of {len(rows)} in {time.monotonic() - t0:.0f} s;"
          f" logs in {logdir}")  # fmt: skip
    for s, r in rows:
        if r["result"] in ("FAIL", "offline") and r.get("where"):
            print(f"  {s.stem}: {r['cause']}\n    raised at {r['where']}")
            if a.verbose:
                print("    " + r["traceback"].rstrip().replace("\n", "\n    "))
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get(BOOT_ENV):
        bootstrap(os.environ[BOOT_ENV], sys.argv[1:])
    else:
        sys.exit(main())

"""Step time of four ways to split HF models into 2 pipeline stages: manual, equal params, autosplit, graphsplit.

Run: ``python benchmarks/split_policies.py [--steps 20] [--models bert,gpt2,llama,opt]``. Each model is
built from a config (random weights, no downloads, dropout 0, no cache). The splits are computed
once here (one thread), then two spawned ranks (gloo over a FileStore, one thread each) train with
``Schedule1F1B`` and 4 micro-batches. Every split's steps are interleaved in blocks with the others
so that background load hits all columns alike; the table shows the mean step time after warm-up
and, for each policy, its ratio to the manual split. Not a test: nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pippy import Schedule1F1B, SplitPoint, pipeline
from pippy.frontend.costsplit import autosplit, graphsplit
from pippy.frontend.policies import SplitPolicyBase, split_by_names, split_equal_params

HIDDEN, LAYERS, HEADS, FFN, VOCAB, SEQ, BATCH, CHUNKS = 256, 4, 4, 1024, 8192, 128, 8, 4
COLUMNS = ("manual", "equal-params", "autosplit", "graphsplit")


def build(name: str) -> tuple[torch.nn.Module, str]:
    """The model (float32, train mode, seeded) and the FQN of its middle layer (the manual cut goes after it)."""
    import transformers as tf

    torch.manual_seed(0)
    common: dict[str, Any] = {"vocab_size": VOCAB, "use_cache": False}
    mid = LAYERS // 2 - 1
    if name == "bert":
        cfg = tf.BertConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
            max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common,
        )
        return tf.BertForMaskedLM(cfg), f"bert.encoder.layer.{mid}"
    if name == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=SEQ,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common,
        )
        return tf.GPT2LMHeadModel(cfg), f"transformer.h.{mid}"
    if name == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=SEQ, attention_dropout=0.0, **common,
        )
        return tf.LlamaForCausalLM(cfg), f"model.layers.{mid}"
    if name == "opt":
        cfg = tf.OPTConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
            word_embed_proj_dim=HIDDEN, max_position_embeddings=SEQ, dropout=0.0, attention_dropout=0.0,
            layerdrop=0.0, **common,
        )
        return tf.OPTForCausalLM(cfg), f"model.decoder.layers.{mid}"
    raise KeyError(name)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def lm_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def plan(name: str) -> tuple[dict[str, dict[str, int] | None], dict[str, str]]:
    """Stage-by-node-name maps for the policies (None = manual split_spec) and their split reports."""
    x, _ = batch()
    policies: dict[str, Callable[[], SplitPolicyBase]] = {
        "equal-params": lambda: split_equal_params(2),
        "autosplit": lambda: autosplit(2, cost="time"),
        "graphsplit": lambda: graphsplit(2, cost="time"),
    }
    splits: dict[str, dict[str, int] | None] = {"manual": None}
    reports: dict[str, str] = {}
    for col, make in policies.items():
        model, _ = build(name)
        policy = make()
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = pipeline(model, CHUNKS, example_args=(x,), split_policy=policy)
        took = time.perf_counter() - t0
        notes = "".join(f"\n  warning: {w.message}" for w in caught if issubclass(w.category, UserWarning))
        splits[col] = policy.last_assignment
        reports[col] = f"{col} (split in {took:.1f}s):\n{pipe.split_report()}{notes}"
    return splits, reports


def _rank(rank: int, store_path: str, jobs: list[tuple[str, dict[str, dict[str, int] | None]]], steps: int, q: Any) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("PIPPY_TIMEOUT", "300")
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=300))
    try:
        x, y = batch()
        results: dict[str, dict[str, float]] = {}
        for name, splits in jobs:
            scheds = {}
            for col, names in splits.items():
                model, mid = build(name)
                if names is None:
                    pipe = pipeline(model, CHUNKS, example_args=(x,), split_spec={mid: SplitPoint.END})
                else:
                    pipe = pipeline(model, CHUNKS, example_args=(x,), split_policy=split_by_names(names))
                stage = pipe.build_stage(rank, "cpu")
                scheds[col] = (stage, Schedule1F1B(stage, CHUNKS, loss_fn=lm_loss))
            total = dict.fromkeys(scheds, 0.0)
            block = 2  # small blocks, round robin: background load hits every split alike
            for r in range(-1, steps // block):  # round -1 is the warm-up
                for col, (stage, sched) in scheds.items():
                    dist.barrier()
                    t0 = time.perf_counter()
                    for _ in range(block):
                        stage.submod.zero_grad(set_to_none=True)
                        if rank == 0:
                            sched.step(x)
                        else:
                            sched.step(target=y)
                    dist.barrier()
                    if r >= 0:
                        total[col] += time.perf_counter() - t0
            results[name] = {col: t / (block * (steps // block)) for col, t in total.items()}
        q.put((rank, results))
    except BaseException as exc:
        import traceback

        q.put((rank, traceback.format_exc() + repr(exc)))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--models", default="bert,gpt2,llama,opt")
    ap.add_argument("--reports", action="store_true", help="print each policy's split report")
    args = ap.parse_args()
    torch.set_num_threads(1)
    jobs = []
    for name in args.models.split(","):
        splits, reports = plan(name)
        jobs.append((name, splits))
        if args.reports:
            print(f"== {name}\n" + "\n".join(reports.values()))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, os.path.join(tmp, "store"), jobs, args.steps, q)) for r in range(2)]
        for p in procs:
            p.start()
        answers = dict(q.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    for r, a in answers.items():
        if isinstance(a, str):
            raise SystemExit(f"rank {r} failed:\n{a}")
    res = answers[0]
    print(f"2 ranks (gloo, 1 thread each), Schedule1F1B, {CHUNKS} micro-batches, batch {BATCH}x{SEQ}, "
          f"hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}; mean step time over {args.steps} steps (ms)")
    head = f"| {'model':<6} | ranks | " + " | ".join(f"{c:>16}" for c in COLUMNS) + " |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, _ in jobs:
        row = res[name]
        base = row["manual"]
        cells = [f"{row['manual'] * 1e3:16.1f}"] + [
            f"{row[c] * 1e3:8.1f} ({row[c] / base:.2f}x)" for c in COLUMNS[1:]
        ]
        print(f"| {name:<6} | {2:>5} | " + " | ".join(f"{c:>16}" for c in cells) + " |")


if __name__ == "__main__":
    main()

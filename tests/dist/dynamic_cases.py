"""Variable sequence lengths under a real gloo group: shape headers over gloo, and a bad length failing every rank."""

from __future__ import annotations

import time
from typing import Any

import torch
import transformers as tf

from pippy import Schedule1F1B, ScheduleZBV, SplitPoint, pipeline
from pippy.frontend.trace import trace_count

LENGTHS = (64, 128, 96, 17)


def _loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out["logits"].flatten(0, 1), y.flatten())


def varying_lengths(rank: int, world: int) -> dict[str, Any]:
    """GPT-2 under 1F1B (2 stages) and ZB-V (4 stages) over LENGTHS; this rank's max grad error per step."""
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=96, n_positions=256)
    model = tf.GPT2LMHeadModel(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 96, (4, n), generator=g), torch.randint(0, 96, (4, n), generator=g)) for n in LENGTHS]
    report: dict[str, Any] = {}
    for name, cls, n_stages in (("1f1b", Schedule1F1B, 2), ("zbv", ScheduleZBV, 4)):
        spec = {f"transformer.h.{i}": SplitPoint.END for i in range(n_stages - 1)}
        dyn = "auto" if name == "zbv" else {"input_ids": {1: (2, 256)}}  # both forms
        pipe = pipeline(model, 2, (), {"input_ids": batches[0][0]}, split_spec=spec, dynamic_shapes=dyn)
        traced = trace_count()
        placement = cls.placement(world, n_stages // world)
        mine = [pipe.build_stage(s, "cpu") for s in range(n_stages) if placement[s] == rank]
        sched = cls(mine[0] if len(mine) == 1 else mine, 2, loss_fn=_loss, loss_reduction="mean")
        errs = []
        for x, y in batches:
            for st in mine:
                st.submod.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            out = sched.step(input_ids=x, target=y) if placement[0] == rank else sched.step(target=y)
            _loss(model(input_ids=x), y).backward()
            err = 0.0
            for st in mine:
                for fqn, p in st.unwrapped.named_parameters():
                    if p.grad is not None:
                        err = max(err, (p.grad - model.get_parameter(fqn).grad).abs().max().item())
            if placement[-1] == rank:
                err = max(err, (out["logits"] - model(input_ids=x).logits).abs().max().item())
            errs.append(err)
        if name == "1f1b":
            bounded = (sched, placement)
        report[name] = {"errs": errs, "retraced": trace_count() - traced, "params": sum(
            1 for st in mine for _, p in st.unwrapped.named_parameters() if p.grad is not None)}
    # a length outside the traced range: rank 0 says why, rank 1 stops at once instead of timing out
    sched, placement = bounded
    x = torch.randint(0, 96, (4, 300))
    t0 = time.monotonic()
    try:
        sched.step(input_ids=x, target=x) if placement[0] == rank else sched.step(target=x)
        report["bad"] = "no error"
    except Exception as exc:  # noqa: BLE001 - the message is the result
        report["bad"] = f"{type(exc).__name__}: {exc}"
    report["bad_s"] = time.monotonic() - t0
    return report

"""Small models shared by the tests (float64, deterministic, no downloads)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pippy import pipe_split


class MLPStack(nn.Module):
    """``n`` residual Linear-ReLU-Linear blocks then a head; split points named ``blocks.i``."""

    def __init__(self, n: int = 4, d: int = 8, hidden: int = 16, out: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d)) for _ in range(n))
        self.head = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


class MarkedMLP(MLPStack):
    """MLPStack with ``pipe_split()`` after every ``per_stage`` blocks."""

    def __init__(self, n: int = 4, per_stage: int = 1, **kw: Any) -> None:
        super().__init__(n, **kw)
        self.per_stage = per_stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, b in enumerate(self.blocks):
            x = x + b(x)
            if (i + 1) % self.per_stage == 0 and i + 1 < len(self.blocks):
                pipe_split()
        return self.head(x)


class SkipNet(nn.Module):
    """``n_stages`` stages; stage 0's output also feeds the last stage directly (a skip edge)."""

    def __init__(self, n_stages: int = 3, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.mids = nn.ModuleList(nn.Linear(d, d) for _ in range(n_stages - 2))
        self.out = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = torch.tanh(self.inp(x))
        h = h0
        for m in self.mids:
            pipe_split()
            h = torch.tanh(m(h))
        pipe_split()
        return self.out(h + h0)


class AuxBranch(nn.Module):
    """``n_stages`` stages; stage 0 also computes an aux head whose value only goes to the output.

    With :func:`main_mse` (the loss reads ``out[0]`` only) no gradient reaches ``aux``: its
    parameters keep ``.grad is None`` in the plain model, and must in the pipeline too.
    """

    def __init__(self, n_stages: int = 3, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.mids = nn.ModuleList(nn.Linear(d, d) for _ in range(n_stages))
        self.aux = nn.Linear(d, 3)
        self.out = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.mids[0](torch.tanh(self.inp(x))))
        aux = self.aux(h)
        for m in self.mids[1:]:
            pipe_split()
            h = torch.tanh(m(h))
        return self.out(h), aux


def main_mse(out: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``out[0]`` (an aux output beside it gets no gradient)."""
    return F.mse_loss(out[0], target)


main_mse.reduction = "mean"  # type: ignore[attr-defined]


class TwoInputs(nn.Module):
    """Two positional inputs and a keyword tensor; the keyword is read only by the last stage."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.c = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, bias: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x) + y)
        pipe_split()
        h = torch.relu(self.b(h))
        pipe_split()
        return self.c(h) + bias


class MyNetwork(nn.Module):
    """The PiPPy README network: three Linear+ReLU blocks and an output projection."""

    def __init__(self, in_dim: int = 16, out_dim: int = 4) -> None:
        super().__init__()
        self.layer0 = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU())
        self.output_proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_proj(self.layer2(self.layer1(self.layer0(x))))


def gpt2(n_layer: int = 2, width: int = 32, vocab: int = 96, seq: int = 16) -> nn.Module:
    """GPT-2 LM from config: random init, no dropout, no cache, float64."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=n_layer, n_embd=width, n_head=2, vocab_size=vocab, n_positions=seq, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).double()


def lm_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy of an HF causal-LM output against token targets."""
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


lm_loss.reduction = "mean"  # type: ignore[attr-defined]


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return F.mse_loss(out, target)


mse.reduction = "mean"  # type: ignore[attr-defined]  # tells pippy how it reduces (else it warns and assumes mean)


def check_mse_step(lp: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, atol: float = 1e-13) -> None:
    """One ``lp.step`` with a mean-squared-error loss equals the plain model: output and every parameter grad."""
    lp.zero_grad()
    model.zero_grad(set_to_none=True)
    out = lp.step(x, target=y)
    ref = model(x)
    F.mse_loss(ref, y).backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)
    grads = lp.named_grads()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_grads_equal(lp: Any, ref: nn.Module, rtol: float = 1e-12, atol: float = 1e-14) -> None:
    """Every parameter gradient of the in-process pipeline ``lp`` equals the reference model's."""
    grads = dict(lp.named_grads())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=rtol, atol=atol)


def mlp_pipe(n_stages: int, n_microbatches: int, batch: int = 16) -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor]:
    """A float64 ``MLPStack(n=4, d=8)`` cut after each of its first ``n_stages - 1`` blocks: (model, pipe, x, y)."""
    from pippy import SplitPoint, pipeline

    torch.manual_seed(0)
    model = MLPStack(n=4, d=8).double()
    x, y = torch.randn(batch, 8, dtype=torch.float64), torch.randn(batch, 4, dtype=torch.float64)
    pipe = pipeline(model, n_microbatches, (x,), split_spec={f"blocks.{i}": SplitPoint.END for i in range(n_stages - 1)})
    return model, pipe, x, y



def schedule_cost_cases(name: str, ps: tuple[int, ...] = (2, 3, 4)) -> Any:
    """Yield ``(p, m, schedule, seed, costs)`` for ``make_schedule(name, p, m)``, m in (p, 2p), skipping (p, m) the
    schedule refuses; the costs are the default ones (seed -1) and three random models (seeds 0-2)."""
    import random

    from pippy.schedules.generators import make_schedule
    from pippy.sim.choose import default_costs
    from pippy.sim.cost import CostModel, StageCost

    for p in ps:
        for m in (p, 2 * p):
            try:
                sch = make_schedule(name, p, m)
            except ValueError:  # e.g. DualPipeV's m >= 2p - 1
                continue
            for seed in range(-1, 3):
                if seed < 0:
                    yield p, m, sch, seed, default_costs(sch.num_stages)
                    continue
                rnd = random.Random(seed)
                yield p, m, sch, seed, CostModel(
                    stages=[StageCost(f=rnd.uniform(0.5, 2), i=rnd.uniform(0.5, 2), w=rnd.uniform(0.2, 2),
                                      fused_b=rnd.uniform(0.8, 3), act_bytes=rnd.uniform(1, 3))
                            for _ in range(sch.num_stages)], latency=rnd.uniform(0, 0.3))


class SharedEnds(nn.Module):
    """One module called in the first and the last stage (four stages): one FQN in two stages, both on rank 0 under
    ZB-V."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.mid = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pippy import pipe_split

        h = torch.tanh(self.shared(x))
        pipe_split()
        h = torch.tanh(self.mid[0](h))
        pipe_split()
        h = torch.tanh(self.mid[1](h))
        pipe_split()
        return self.shared(h)


def train_steps(lp: Any, opts: Any, steps: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """``steps`` steps of ``lp`` (a ``LocalPipeline``) on ``x`` / ``y``, each zeroing and stepping every optimizer."""
    for _ in range(steps):
        for o in opts:
            o.zero_grad()
        lp.step(x, target=y)
        for o in opts:
            o.step()


class Returns(nn.Module):
    """Two linears cut by pipe_split(); ``ret`` picks what forward returns: "tensor", "none", "pair" (out, None),
    "dict" {"logits", "aux"} or "tuple" (out, hidden)."""

    def __init__(self, ret: str = "tensor") -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)
        self.ret = ret

    def forward(self, x: torch.Tensor) -> Any:
        h = self.a(x)
        pipe_split()
        out = self.b(h)
        return {"none": None, "pair": (out, None), "dict": {"logits": out, "aux": out.sum()},
                "tuple": (out, h)}.get(self.ret, out)


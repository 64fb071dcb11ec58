"""Check a causal LM's generation cut against the whole model: logits on a prompt, a left-padded batch, a decode step.

``check_cut(model, plan)`` runs the stages that ``cut_stage`` makes on two tiny inputs, one row
without a mask and two rows of which one is left-padded (with the mask and the positions pippy's
generate passes), each as a prefill and one decode step through the stages' caches, and raises a
:class:`GenerationError` when their logits differ from one forward of the whole model, or when the
stages fail to run at all (the error chained as the cause).

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from pippy.frontend.genpipe import plan_generation
    >>> gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).eval()
    >>> check_cut(gpt2, plan_generation(gpt2, 2))
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from pippy.frontend.gencut import cut_stage
from pippy.frontend.genpipe import GenerationError, GenPlan

__all__ = ["check_cut"]

_ELSE = ("Run the forward pipeline (pippy.pipeline and a schedule's eval) instead, or report the architecture; "
         "check=False skips this check.")


def _fail(what: str) -> GenerationError:
    return GenerationError(f"pipeline_for_generation: {what}")


def check_cut(model: nn.Module, plan: GenPlan, prompt: int = 3) -> None:
    """Run the cut stages on short prompts and one decode step; raise when their logits differ from ``model``'s.

    Catches an architecture whose base or head forward does more than pipelined generation
    re-creates (a transform of ``inputs_embeds``, a scale of the logits, a mask it reads its own
    way), and turns any error the stages raise into a :class:`GenerationError`. Skipped for a model
    on the meta device. The tolerance follows the parameters' dtype.

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from pippy.frontend.genpipe import plan_generation
        >>> llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
        ...     num_attention_heads=2, num_key_value_heads=1, vocab_size=40, max_position_embeddings=32))
        >>> check_cut(llama, plan_generation(llama, 2), prompt=4)
    """
    param = next(model.parameters(), None)
    if param is None or param.device.type == "meta":
        return
    n = min(prompt + 1, plan.max_length)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(1, n + 1, device=param.device) * 7 % vocab).unsqueeze(0)  # [1, n]
    modes = [(m, m.training) for m in model.modules()]  # compared in eval mode (no dropout), then put back
    try:
        model.eval()
        _compare(model, plan, ids, None)
        if n >= 3:  # two rows, the second left-padded by one: positions count from its first real token
            mask = torch.ones((2, n), dtype=torch.long, device=param.device)
            mask[1, 0] = 0
            two = torch.cat([ids, (ids * 3 + 1) % vocab]).masked_fill(mask == 0, 0)  # [2, n]
            _compare(model, plan, two, mask)
    except GenerationError:
        raise
    except Exception as exc:
        raise _fail(
            f"expected the {plan.num_stages} cut stages of {type(model).__name__} to run a short test prompt, but "
            f"they raised {type(exc).__name__}: {str(exc)[:300]}. The cut does not fit this architecture. {_ELSE}"
        ) from exc
    finally:
        for m, flag in modes:
            m.training = flag


def _compare(model: nn.Module, plan: GenPlan, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
    n, dev = ids.shape[1], ids.device
    if mask is None:
        pos = torch.arange(n, device=dev).expand(ids.shape[0], n)
    else:
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [b, n], as pippy.generate and model.generate make them
    stages = [cut_stage(model, plan, i) for i in range(plan.num_stages)]
    caches = [st.new_cache() for st in stages]
    param = next(model.parameters())
    tol = {torch.float64: 1e-6, torch.float32: 2e-3}.get(param.dtype, 5e-2)
    extra = {} if mask is None else {"attention_mask": mask}
    if mask is not None and "position_ids" in inspect.signature(model.forward).parameters:
        extra["position_ids"] = pos  # model.generate passes them only to a forward that names them
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False, **extra).logits.float()  # [b, n, vocab]
        for lo, hi in ((0, n - 1), (n - 1, n)):  # prefill, then one decode step through the caches
            x = ids[:, lo:hi]
            for st, cache in zip(stages, caches):
                x = st(x, None if mask is None else mask[:, :hi], pos[:, lo:hi], cache)
            want = full[:, hi - 1]  # [b, vocab]
            rows = torch.isfinite(want).all(-1)  # a row the model itself gives non-finite logits is not compared
            got, want = x[rows], want[rows]
            err = float((got - want).abs().max()) if got.numel() else 0.0
            if not err <= tol * max(1.0, float(want.abs().max()) if want.numel() else 1.0):  # NaN fails too
                step = "the prompt" if lo == 0 else "a decode step"
                batch = "" if mask is None else " of a left-padded batch"
                raise _fail(
                    f"the {plan.num_stages} cut stages of {type(model).__name__} give logits that differ from the model's "
                    f"by {err:.3g} on {step}{batch} (allowed {tol:g} x the logits' scale): its forward does something the "
                    "cut does not re-create (e.g. a transform of the embeddings or of the logits, or its own reading of "
                    f"the attention mask), so generated tokens would be wrong. {_ELSE}"
                )

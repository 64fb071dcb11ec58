"""``pippy.generate``: pipelined text generation with a KV cache per stage, token for token as ``model.generate``.

Under torchrun, on every rank (2 ranks here)::

    pipe = pippy.pipeline_for_generation(model, 2, max_length=128)
    stage = pipe.build_stage(rank, "cpu")
    out = pippy.generate(stage, input_ids, attention_mask=mask, max_new_tokens=32, groups=2)

In one process, pass every stage (tests, debugging); the result is the same:

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=64, eos_token_id=None)
    >>> model = GPT2LMHeadModel(cfg).eval()
    >>> pipe = pipeline_for_generation(model, 2, max_length=32)
    >>> ids = torch.randint(0, 50, (4, 6)); mask = torch.ones_like(ids); mask[0, :2] = 0
    >>> out = generate([pipe.build_stage(r) for r in range(2)], ids, attention_mask=mask, max_new_tokens=5,
    ...                groups=2, progress=0)
    >>> torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))
    True
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import torch
import torch.distributed as dist

from pippy.frontend.genpipe import GenerationError
from pippy.runtime.comm import DistTransport, PipeCommError
from pippy.runtime.genpick import Picker
from pippy.runtime.genproto import Request, run_rank
from pippy.runtime.genstage import GenerationPipe, GenerationStage, pipeline_for_generation
from pippy.runtime.localcomm import LocalTransport
from pippy.runtime.watch import drop_at_exit

__all__ = ["GenerationError", "GenerationPipe", "GenerationStage", "generate", "pipeline_for_generation"]


def generate(
    stage: GenerationStage | Sequence[GenerationStage],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    groups: int = 1,
    in_flight: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    progress: int = 8,
    timeout: float | None = None,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens per prompt through the pipeline; returns ``[B, L + new]`` on every rank.

    Call it on every rank with the same arguments. ``input_ids`` ``[B, L]`` are left-padded prompts
    and ``attention_mask`` marks the real tokens (``None``: no padding). The batch is cut into
    ``groups`` equal groups kept in flight at once (use ``groups >= num_stages`` to keep every stage
    busy); ``in_flight`` caps how many are in the pipeline at once (default: all; 1 runs them one
    after another, for comparison). Greedy by default; ``do_sample=True`` samples with ``temperature`` / ``top_k`` / ``top_p``
    (defaults from the model's generation config, as ``model.generate``) from a generator seeded
    with ``seed`` (``None``: torch's default generator on the last rank). A row stops at an EOS
    (``eos_token_id``, default the model's) and then gets ``pad_token_id``; the output is padded with
    it to the longest group, as ``model.generate`` pads the batch. The last rank prints a progress line
    every ``progress`` new tokens (0: none); every wait is bounded by ``timeout`` seconds (default
    ``PIPPY_TIMEOUT`` or 300). ``stage`` may also be the list of all stages, run in this process.

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        ...                   num_key_value_heads=1, vocab_size=40, max_position_embeddings=32)
        >>> pipe = pipeline_for_generation(LlamaForCausalLM(cfg), 2)
        >>> stages = [pipe.build_stage(r) for r in range(2)]
        >>> ids = torch.randint(3, 40, (2, 4))
        >>> a = generate(stages, ids, max_new_tokens=6, do_sample=True, seed=7, progress=0)
        >>> torch.equal(a, generate(stages, ids, max_new_tokens=6, do_sample=True, seed=7, progress=0))
        True
        >>> generate(stages, ids, max_new_tokens=6, groups=3)
        Traceback (most recent call last):
        ...
        pippy.frontend.genpipe.GenerationError: pippy.generate on rank 0, stage 0: expected a batch that splits into groups=3 equal groups, got a batch of 2 prompts. Pass a batch size divisible by groups (pad the batch with dummy prompts), or a groups value that divides 2.
    """
    stages = list(stage) if isinstance(stage, Sequence) else [stage]
    if not stages or not all(isinstance(s, GenerationStage) for s in stages):
        raise GenerationError(
            f"pippy.generate: expected a GenerationStage (pipe.build_stage(rank, device)) or the list of all of them, "
            f"got {type(stage).__name__}. Build the pipe with pippy.pipeline_for_generation."
        )
    req = _request(stages[0], input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, seed,
                   groups, in_flight, eos_token_id, pad_token_id, progress)
    if len(stages) > 1 or stages[0].num_stages == 1:
        return _run_local(stages, req, timeout).to(input_ids.device)
    return _run_dist(stages[0], req, timeout).to(input_ids.device)


def _request(
    stage: GenerationStage, ids: torch.Tensor, mask: torch.Tensor | None, max_new: int, do_sample: bool,
    temperature: float | None, top_k: int | None, top_p: float | None, seed: int | None, groups: int,
    in_flight: int | None, eos: int | Sequence[int] | None, pad: int | None, progress: int,
) -> Request:
    """Check the inputs (the same on every rank, so every rank raises alike) and compute masks and positions."""
    where = f"pippy.generate on rank {stage.index}, stage {stage.index}"

    def bad(text: str) -> GenerationError:
        return GenerationError(f"{where}: {text}")

    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.numel() == 0:
        got = f"{ids.dtype}{list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise bad(f"expected input_ids as a 2-D integer tensor [batch, prompt length], got {got}. Tokenize with "
                  "return_tensors='pt' and padding_side='left'.")
    batch, length = ids.shape
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0:
        raise bad(f"expected max_new_tokens >= 1, got {max_new!r}. Ask for at least one new token.")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or batch % groups:
        raise bad(f"expected a batch that splits into groups={groups} equal groups, got a batch of {batch} prompts. "
                  f"Pass a batch size divisible by groups (pad the batch with dummy prompts), or a groups value that "
                  f"divides {batch}.")
    if in_flight is None:
        in_flight = groups
    if isinstance(in_flight, bool) or not isinstance(in_flight, int) or not 1 <= in_flight <= groups:
        raise bad(f"expected in_flight between 1 and groups={groups}, got {in_flight!r}. Leave it out to keep every "
                  "group in flight.")
    limit = stage.max_length
    if length + max_new > limit:
        what = "the prompt alone is longer than" if length >= limit else "prompt + max_new_tokens exceeds"
        raise bad(f"{what} the KV cache: expected prompt length + max_new_tokens <= max_length={limit}, got "
                  f"{length} + {max_new} = {length + max_new}. Shorten the prompt, lower max_new_tokens to "
                  f"{max(limit - length, 0)}, or build the pipe with a larger max_length "
                  "(pipeline_for_generation(..., max_length=...), at most the model's max_position_embeddings).")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, length):
            shape = str(list(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise bad(f"expected attention_mask of the shape of input_ids {[batch, length]}, got {shape}. Pass the mask "
                      "the tokenizer returned with the ids.")
        if not bool(((mask == 0) | (mask == 1)).all()) or not bool(mask.any(dim=1).all()):
            raise bad("expected attention_mask of 0 (padding) and 1 (token) with at least one 1 per row, got other "
                      "values or an empty row. Drop empty prompts and pass the tokenizer's mask.")
    p_temp, p_top_k, p_top_p = stage.plan.sampling
    temp = p_temp if temperature is None else float(temperature)
    k = p_top_k if top_k is None else int(top_k)
    p = p_top_p if top_p is None else float(top_p)
    if do_sample and (temp <= 0 or k < 0 or not 0 < p <= 1):
        raise bad(f"expected temperature > 0, top_k >= 0 and 0 < top_p <= 1 for sampling, got temperature={temp}, "
                  f"top_k={k}, top_p={p}. Use do_sample=False for greedy decoding.")
    eos_ids = stage.plan.eos_token_ids if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    pad_id = pad if pad is not None else stage.plan.pad_token_id
    if pad_id is None:
        pad_id = eos_ids[0] if eos_ids else 0  # model.generate pads with the first EOS id
    dev = stage.device
    ids = ids.to(dev)
    if mask is not None:
        mask = mask.to(dev, torch.long)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as model.generate computes them
        if bool(mask.all()):
            mask = None  # model.generate drops an all-ones mask too
    else:
        positions = torch.arange(length, device=dev).expand(batch, length)
    generator = None
    if do_sample and seed is not None:  # used by the last stage only
        generator = torch.Generator(dev).manual_seed(int(seed))
    picker = Picker(do_sample=bool(do_sample), temperature=temp, top_k=k, top_p=p, generator=generator)
    return Request(input_ids=ids, mask=mask, positions=positions, groups=groups, in_flight=in_flight,
                   max_new_tokens=max_new,
                   eos=torch.tensor(eos_ids, dtype=torch.long, device=dev), pad_token_id=int(pad_id), picker=picker,
                   progress=max(int(progress), 0))


def _complete(run: Generator[None, None, torch.Tensor]) -> torch.Tensor:
    while True:
        try:
            next(run)
        except StopIteration as done:
            return done.value


def _run_dist(stage: GenerationStage, req: Request, timeout: float | None) -> torch.Tensor:
    where = f"pippy.generate on rank {stage.index}, stage {stage.index}"
    if not (dist.is_available() and dist.is_initialized()):
        raise GenerationError(
            f"{where}: expected torch.distributed to be initialized with one rank per stage ({stage.num_stages}), got "
            "no process group. Launch with torchrun --nproc-per-node N and call dist.init_process_group, or pass "
            "the list of all stages to run them in this process."
        )
    transport = DistTransport(group=stage.group, timeout=timeout, device=stage.device)
    drop_at_exit(stage, "group")
    if transport.world_size != stage.num_stages or transport.rank != stage.index:
        raise GenerationError(
            f"{where}: expected a process group of {stage.num_stages} ranks where this rank is {stage.index}, got "
            f"rank {transport.rank} of {transport.world_size}. Build the stage with pipe.build_stage(rank, device, "
            "group) using this rank's index in the pipeline group."
        )
    facts = {"batch": list(req.input_ids.shape), "max_new_tokens": req.max_new_tokens, "groups": req.groups,
             "in_flight": req.in_flight, "do_sample": req.picker.do_sample, "layers": [list(b) for b in stage.plan.layers]}
    try:
        transport.agree(facts, where)
        return _complete(run_rank(stage, transport, req))
    except BaseException as exc:  # tell the other ranks, so that their waits stop at once, then raise here
        transport.fail(f"rank {stage.index}, stage {stage.index} failed in pippy.generate: {type(exc).__name__}: {exc}")
        raise


def _run_local(stages: list[GenerationStage], req: Request, timeout: float | None) -> torch.Tensor:
    """Drive every stage in this process, in turn, over an in-process transport; a round where nothing moves is a stall.

    The transport is ordered (for 2+ stages): it checks every message against what NCCL needs (the k-th receive
    between two ranks is the k-th send, and no two ranks' posting orders cross) and raises where one would not hold.
    """
    n = stages[0].num_stages
    if sorted(s.index for s in stages) != list(range(n)) or any(s.plan != stages[0].plan for s in stages):
        raise GenerationError(
            f"pippy.generate: expected all {n} stages of one pipe to run in this process, got stages "
            f"{sorted(s.index for s in stages)}. Pass [pipe.build_stage(r) for r in range(pipe.num_stages)], or one "
            "stage per rank under torchrun."
        )
    stages = sorted(stages, key=lambda s: s.index)
    transports = LocalTransport.world(n, timeout)
    for t in transports:
        t.ordered = n > 1  # (one stage sends its tokens to itself: no order between ranks to check)
    runs = [run_rank(st, t, req) for st, t in zip(stages, transports)]
    results: dict[int, torch.Tensor] = {}
    while len(results) < n:
        before = [t.waiting for t in transports]
        moved = False
        for r, run in enumerate(runs):
            if r in results:
                continue
            try:
                next(run)
            except StopIteration as done:
                results[r] = done.value
                moved = True
            if transports[r].waiting is None or transports[r].waiting is not before[r]:
                moved = True
        if not moved:
            waits = "; ".join(w.describe() for w in (t.waiting for t in transports) if w is not None)
            raise PipeCommError(f"pipelined generation stalled: every stage waits and none can move ({waits})")
    return results[n - 1]

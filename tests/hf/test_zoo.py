"""HF zoo transparency in one process: outputs, loss and every parameter grad equal the unpipelined model."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from zoo_models import ZOO, build, grad_err, max_err
from zoo_pippy_models import PIPPY_ZOO

from pippy import PipeTraceError, Schedule1F1B, ScheduleInterleaved1F1B, SplitPoint, pipeline
from pippy.frontend.split import USER
from pippy.hf import layer_names, split_spec_equal_layers
from pippy.recompute import enable_recompute
from pippy.runtime.local import LocalPipeline

TOL = 1e-10


def _transparency(name: str, n_stages: int, spec: dict[str, SplitPoint] | None = None,
                  recompute: str | None = None) -> None:
    case = build(name)
    ref = copy.deepcopy(case.model)
    out_ref = ref(*case.args, **case.kwargs)
    loss_ref = case.loss_fn(out_ref, case.target) if case.loss_fn else out_ref.loss
    loss_ref.backward()
    spec = spec if spec is not None else split_spec_equal_layers(case.model, n_stages, case.layers)
    n_mb = 2 if n_stages == 2 else 4
    pipe = pipeline(case.model, n_mb, case.args, case.kwargs, split_spec=spec)
    assert pipe.num_stages == n_stages, (name, spec, pipe.num_stages)
    cls = Schedule1F1B if n_stages == 2 else ScheduleInterleaved1F1B
    lp = LocalPipeline(pipe, cls, num_ranks=2, n_microbatches=n_mb, loss_fn=case.loss_fn,
                       output_merge_spec=case.extra.get("output_merge_spec"))
    if recompute is not None:
        for st in lp.stages:
            enable_recompute(st, recompute)  # type: ignore[arg-type]
    losses: list[torch.Tensor] = []
    out = lp.step(*case.args, target=case.target, losses=losses, **case.kwargs)
    # HF's in-model losses upcast logits to float32; compare those at float32 precision
    loss_tol = 1e-6 * max(1.0, abs(float(loss_ref))) if loss_ref.dtype == torch.float32 else TOL
    tol = case.extra.get("tol", TOL)  # a model that computes part of its float64 forward in float32 says so
    loss_tol = max(loss_tol, tol)
    assert abs(float(torch.stack(losses).mean()) - float(loss_ref)) < loss_tol
    assert max_err(out, out_ref) < (loss_tol if case.loss_fn is None else tol)
    assert grad_err(ref, lp.named_grads()) < tol
    ev = lp.eval(*case.args, **case.kwargs)
    assert max_err(ev, out_ref) < (loss_tol if case.loss_fn is None else tol)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_two_stages(name: str) -> None:
    _transparency(name, 2)


@pytest.mark.parametrize("name", ZOO + PIPPY_ZOO)
def test_zoo_pointwise_recompute(name: str) -> None:
    """Elementwise chains recomputed in backward: every architecture stays exact."""
    _transparency(name, 2, recompute="pointwise")


# Some of these never read some parameters in this forward: the *ForCausalLM decoders of encoder-decoder families
# build cross-attention (encoder_attn*) that a run without encoder states never reads; XLNet reads
# transformer.mask_emb only with target_mapping. They must still be in a stage (grad None, as in the plain model).
_UNREAD = {"mbart_causal": ".encoder_attn", "blenderbot_causal": ".encoder_attn", "trocr_causal": ".encoder_attn",
           "xlnet": "transformer.mask_emb"}


@pytest.mark.parametrize("name", PIPPY_ZOO)
def test_pippy_example_zoo_two_stages(name: str) -> None:
    """Every architecture PiPPy's HF examples ran, built with its config's default use_cache."""
    _transparency(name, 2)


@pytest.mark.parametrize("name", sorted(_UNREAD))
def test_never_read_parameters_stay_in_a_stage(name: str) -> None:
    case = build(name)
    pipe = pipeline(case.model, 2, case.args, case.kwargs, split_spec=split_spec_equal_layers(case.model, 2))
    held = {n for i in range(pipe.num_stages) for n in pipe.get_stage_module(i).state_dict()}
    assert held == set(case.model.state_dict()), name
    assert any(_UNREAD[name] in n for n in held)


_USE_CACHE_ON = {"mbart", "mbart_causal", "blenderbot", "blenderbot_causal", "electra", "layoutlm", "megatron_bert",
                 "camembert", "trocr_causal"}


def test_pippy_example_zoo_keeps_default_use_cache() -> None:
    """The builders leave use_cache at its config default (True where the config has it); pippy turns it off."""
    import transformers as T

    for name in PIPPY_ZOO:
        model = build(name).model
        want = True if name in _USE_CACHE_ON else None
        assert getattr(model.config, "use_cache", None) is want, name
        assert all(getattr(m.config, "use_cache", True) is True for m in model.modules() if hasattr(m, "config")), name
    trocr = build("trocr").model
    assert isinstance(trocr.decoder, T.TrOCRForCausalLM) and trocr.decoder.config.use_cache is True
    case = build("electra")
    pipeline(case.model, 2, case.args, case.kwargs, split_spec=split_spec_equal_layers(case.model, 2))
    assert case.model.config.use_cache is True  # switched off only while tracing


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_split_inside_both(name: str) -> None:
    """Four stages on two ranks: two inside the encoder, two inside the decoder (skip edges to the decoder)."""
    spec = split_spec_equal_layers(build(name).model, 4)
    assert sum("encoder" in k for k in spec) == 2 and sum("decoder" in k for k in spec) == 1
    _transparency(name, 4, spec)


def test_albert_shared_layer_across_stages() -> None:
    """ALBERT calls one layer three times; a split after each call puts the same weights in three stages."""
    assert layer_names(build("albert").model) == []
    _transparency("albert", 4, {"albert.encoder.albert_layer_groups.0": SplitPoint.END})


def test_layer_names_and_equal_split() -> None:
    t5 = build("t5").model
    assert layer_names(t5) == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
    assert layer_names(build("gpt2").model) == ["transformer.h.0", "transformer.h.1"]
    blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(5))
    net = torch.nn.ModuleDict({"h": blocks})
    assert split_spec_equal_layers(net, 3) == {"h.1": SplitPoint.END, "h.3": SplitPoint.END}
    assert split_spec_equal_layers(net, 2, "h") == {"h.2": SplitPoint.END}
    assert split_spec_equal_layers(net, 2, ["h.0", "h.4"]) == {"h.0": SplitPoint.END}
    with pytest.raises(ValueError, match="cannot make 6 stages"):
        split_spec_equal_layers(net, 6)
    with pytest.raises(ValueError, match="names no submodule"):
        split_spec_equal_layers(net, 2, ["h.9"])
    with pytest.raises(ValueError, match="no repeated blocks"):
        split_spec_equal_layers(torch.nn.Linear(2, 2), 2)


def test_labels_and_mask_route_to_the_stage_that_reads_them() -> None:
    """User inputs enter at stage 0 and travel to the stage that reads them (transparency is checked above)."""
    case = build("gpt2")
    pipe = pipeline(case.model, 2, case.args, case.kwargs, split_spec=split_spec_equal_layers(case.model, 2))
    assert pipe.stage_infos[0].input_names == ["input_ids", "labels"]
    assert "labels" in pipe.stage_infos[1].input_names  # the in-model loss runs in the last stage
    case = build("bert")
    pipe = pipeline(case.model, 2, case.args, case.kwargs, split_spec=split_spec_equal_layers(case.model, 2))
    assert [r.src_stage for r in pipe.stage_infos[0].inputs] == [USER, USER]
    assert len(pipe.stage_infos[1].inputs) == 2  # hidden states + the (expanded) attention mask


class _DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:
            return h * 2
        return h


def test_trace_error_names_the_construct_and_line() -> None:
    with pytest.raises(PipeTraceError) as info:
        pipeline(_DataDependent(), 2, (torch.randn(4, 4),))
    msg = str(info.value)
    assert "data-dependent control flow" in msg
    assert "test_zoo.py" in msg and "if h.sum() > 0:" in msg
    assert "torch.where" in msg

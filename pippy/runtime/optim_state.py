"""Optimizer state of a rank's stages keyed by the model's FQNs, per stage: what checkpoints save and load.

torch's ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (``torch.distributed.checkpoint.state_dict``)
name optimizer state by parameter FQN and handle FSDP2's sharded parameters; they take one module,
so this rank's stages are put under one holder (``stage<i>.<fqn>``) and the prefix is taken off per
stage. So a stage's state is keyed exactly like its parameters, whatever optimizer spans the stages.

    >>> import torch
    >>> from pippy import SplitPoint, pipeline
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> stages = [pipeline(net, 1, (torch.ones(1, 2),), split_spec={"0": SplitPoint.END}).build_stage(i, "cpu")
    ...           for i in range(2)]
    >>> opt = torch.optim.AdamW([p for st in stages for p in st.parameters()])
    >>> stage_optimizer_states(stages, opt)[1]["state"]        # before any step: none (and saving makes none)
    {}
    >>> stages[0].submod(torch.ones(1, 2))[0].sum().backward()
    >>> opt.step()
    >>> per_stage = stage_optimizer_states(stages, opt)
    >>> sorted(per_stage[0]["state"]), sorted(per_stage[0]["state"]["0.weight"])
    (['0.bias', '0.weight'], ['exp_avg', 'exp_avg_sq', 'step'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pippy.runtime.stage import Stage

__all__ = ["load_stage_optimizer_states", "stage_optimizer_states"]


def _holder(stages: Sequence[Stage]) -> nn.Module:
    holder = nn.Module()
    for st in stages:
        holder.add_module(f"stage{st.index}", st.unwrapped)
    return holder


def _options(full: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def _ensure_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter optimizer state (one step with zero gradients and lr 0), keeping ``.grad`` as it was.

    Only used to make a template that a checkpoint then overwrites: torch's own helper skips
    the step when gradients exist, which is the case mid-training.
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if all(p in optimizer.state and optimizer.state[p] for p in params):
        return
    grads = [p.grad for p in params]
    lrs = [g["lr"] for g in optimizer.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in optimizer.param_groups:
            g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad


def stage_optimizer_states(stages: Sequence[Stage], optimizer: torch.optim.Optimizer, *,
                           full: bool = False, template: bool = False) -> dict[int, dict[str, Any]]:
    """``{stage index: {"state": {fqn: {...}}, "param_groups": [{..., "params": [fqn, ...]}]}}``.

    An optimizer that has not stepped yet gets its state created first (zeros, as torch's
    checkpoint helpers do); ``template=True`` does so even mid-step, when gradients exist (the
    state is about to be overwritten by a load). ``full`` gathers sharded
    (FSDP2) state into whole tensors on the CPU; the default keeps DTensor shards (for DCP).
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if template:
        _ensure_state(optimizer)
    holder = _holder(stages)
    stateless = {id(p) for g in optimizer.param_groups for p in g["params"] if not optimizer.state.get(p)}
    osd = get_optimizer_state_dict(holder, optimizer, options=_options(full))
    if not template and stateless:
        # torch's helper gives a parameter without state some by stepping with zero gradients (Adam's step 1, SGD's
        # momentum from weight decay): take it back, so saving changes neither the training nor what is saved
        for name, p in holder.named_parameters(remove_duplicate=False):
            if id(p) in stateless:
                optimizer.state.pop(p, None)
                osd["state"].pop(name, None)
    out: dict[int, dict[str, Any]] = {}
    for st in stages:
        pre = f"stage{st.index}."
        state = {k[len(pre):]: v for k, v in osd["state"].items() if k.startswith(pre)}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [p[len(pre):] for p in g["params"] if p.startswith(pre)]} for g in osd["param_groups"]]
        out[st.index] = {"state": state, "param_groups": groups}
    return out


def load_stage_optimizer_states(stages: Sequence[Stage], optimizer: torch.optim.Optimizer,
                                per_stage: Mapping[int, Mapping[str, Any]]) -> None:
    """Put ``per_stage`` (as :func:`stage_optimizer_states` returns it, e.g. read back) into ``optimizer``.

    Raises ``KeyError`` naming the stage and parameters when a stage's saved state lacks some of
    its parameters (a checkpoint of another model or split).
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    for st in stages:
        if st.index not in per_stage:
            raise KeyError(f"stage {st.index}: the checkpoint holds no optimizer state for it")
        saved, pre = per_stage[st.index], f"stage{st.index}."
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        want = {n for n, p in st.unwrapped.named_parameters() if p.requires_grad and id(p) in held}
        stray = sorted(set(saved["state"]) - {n for n, _ in st.unwrapped.named_parameters()})
        if stray or (saved["state"] and want and not want & set(saved["state"])):
            given = stray or sorted(saved["state"])
            raise KeyError(f"stage {st.index}: the checkpoint's optimizer state is for {given[:5]}, which the stage's "
                           f"parameters {sorted(want)[:5]} do not match; was it saved from the same model and optimizer?")
        fqn = {id(p): n for n, p in st.unwrapped.named_parameters()}
        for j, (g, now) in enumerate(zip(saved["param_groups"], optimizer.param_groups)):
            mine = sorted(fqn[id(p)] for p in now["params"] if id(p) in fqn)
            if sorted(g["params"]) != mine:
                raise KeyError(f"stage {st.index}: the checkpoint's optimizer group {j} holds {sorted(g['params'])[:5]} "
                               f"but this optimizer's holds {mine[:5]}; was it saved from the same model and optimizer?")
        state.update({pre + k: v for k, v in saved["state"].items()})
        for j, g in enumerate(saved["param_groups"]):
            if j == len(groups):
                groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": []})
            groups[j]["params"].extend(pre + p for p in g["params"])
    set_optimizer_state_dict(_holder(stages), optimizer, {"state": state, "param_groups": groups},
                             options=_options(False))

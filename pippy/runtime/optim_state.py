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

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pippy.runtime.optim_groups import matched_groups
from pippy.runtime.stage import Stage

__all__ = ["load_stage_optimizer_states", "stage_optimizer_states"]


def _holder(stages: Sequence[Stage]) -> nn.Module:
    holder = nn.Module()
    for st in stages:
        holder.add_module(f"stage{st.index}", st.unwrapped)
    return holder


def _options(full: bool, strict: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, strict=strict)


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


def _refuse_foreign(stages: Sequence[Stage], optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer that also holds parameters of stages not passed (torch's helper fails with a bare KeyError)."""
    held = {id(p) for st in stages for p in st.parameters()}
    foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in held]
    if foreign:
        shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:3])
        raise ValueError(
            f"checkpoint: the optimizer also optimizes {len(foreign)} parameter(s) that none of the stages passed "
            f"({sorted(st.index for st in stages)}) holds (shapes {shapes}{', ...' if len(foreign) > 3 else ''}). "
            "Expected the optimizer of exactly these stages. Pass every stage it optimizes in one call, or give each "
            "stage (or each rank's stages) its own optimizer"
        )


def stage_optimizer_states(stages: Sequence[Stage], optimizer: torch.optim.Optimizer, *,
                           full: bool = False, template: bool = False) -> dict[int, dict[str, Any]]:
    """``{stage index: {"state": {fqn: {...}}, "param_groups": [{..., "params": [fqn, ...]}]}}``.

    An optimizer that has not stepped yet gets its state created first (zeros, as torch's
    checkpoint helpers do); ``template=True`` does so even mid-step, when gradients exist (the
    state is about to be overwritten by a load). ``full`` gathers sharded
    (FSDP2) state into whole tensors on the CPU; the default keeps DTensor shards (for DCP).
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    _refuse_foreign(stages, optimizer)
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


def _first_names(stage: Stage) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for n, p in stage.unwrapped.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return names


def _saved_group(names: Sequence[str], where: Sequence[int],
                 by_name: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> Mapping[str, Any] | None:
    """The first saved group holding one of ``names``, looking in the saved stages ``where`` in order."""
    for i in where:
        held = by_name.get(i, {})
        for n in names:
            if n in held:
                return held[n]
    return None


def load_stage_optimizer_states(stages: Sequence[Stage], optimizer: torch.optim.Optimizer,
                                per_stage: Mapping[int, Mapping[str, Any]],
                                saved_groups: Mapping[int, Sequence[Mapping[str, Any]]] | None = None, *,
                                aliases: Mapping[str, Sequence[str]] | None = None) -> None:
    """Put ``per_stage`` (as :func:`stage_optimizer_states` returns it, e.g. read back) into ``optimizer``.

    Each param group of ``optimizer`` takes the hyperparameters of the saved group that held its
    parameters, by FQN (``saved_groups``: saved stage index to its param groups; by default
    ``per_stage``'s own). A stage looks in the saved groups of its own index first, then in the
    other saved stages' (a checkpoint of another split, a tied weight saved in another stage);
    ``aliases`` gives more names to look for (tied FQNs). A parameter without saved state (it
    never had a gradient) gets none, as with ``torch.optim.Optimizer.load_state_dict``. Raises ``KeyError`` naming the stage
    and parameters when the optimizer and the checkpoint hold different parameters, and
    ``ValueError`` when one group would take two sets of hyperparameters.

        >>> import torch
        >>> from pippy import SplitPoint, pipeline
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> st = pipeline(net, 1, (torch.ones(1, 2),), split_spec={"0": SplitPoint.END}).build_stage(1, "cpu")
        >>> w, b = st.submod.get_parameter("1.weight"), st.submod.get_parameter("1.bias")
        >>> saved = {1: {"state": {}, "param_groups": [{"lr": 0.1, "params": ["1.weight"]},
        ...                                            {"lr": 0.2, "params": ["1.bias"]}]}}
        >>> opt = torch.optim.SGD([{"params": [b]}, {"params": [w]}], lr=1.0)  # groups in another order
        >>> load_stage_optimizer_states([st], opt, saved)
        >>> [g["lr"] for g in opt.param_groups]
        [0.2, 0.1]
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if saved_groups is None:
        saved_groups = {i: s["param_groups"] for i, s in per_stage.items()}
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    outside = held - {id(p) for st in stages for p in st.unwrapped.parameters()}
    if outside:
        raise ValueError(f"the optimizer holds {len(outside)} parameters of no stage given to load(); pass every "
                         "stage it optimizes (this rank's stages) in one call")
    by_name = {i: {n: g for g in gs for n in g["params"]} for i, gs in saved_groups.items()}
    state: dict[str, Any] = {}
    found: dict[int, tuple[str, Mapping[str, Any]]] = {}
    fqn: dict[int, str] = {}
    for st in stages:
        if st.index not in per_stage:
            raise KeyError(f"stage {st.index}: the checkpoint holds no optimizer state for it")
        saved, pre = per_stage[st.index], f"stage{st.index}."
        names = _first_names(st)
        stray = sorted(set(saved["state"]) - {n for ns in names.values() for n in ns})
        if stray:
            raise KeyError(f"stage {st.index}: the checkpoint's optimizer state is for {stray[:5]}, which are not the "
                           f"stage's parameters {sorted(ns[0] for ns in names.values())[:5]}; was it saved from the "
                           "same model and optimizer?")
        where = [st.index, *sorted(i for i in saved_groups if i != st.index)]
        missing, extra = [], []
        for pid, ns in names.items():
            group = _saved_group([*ns, *(a for n in ns for a in (aliases or {}).get(n, ()))], where, by_name)
            if pid in held and group is None:
                missing.append(ns[0])
            elif pid not in held and group is not None:
                extra.append(ns[0])
            elif group is not None:
                found[pid] = (f"stage {st.index} {ns[0]!r}", group)
                fqn[pid] = pre + ns[0]
        if missing or extra:
            raise KeyError(
                f"stage {st.index}: the checkpoint's optimizer and this one hold different parameters"
                + (f"; this optimizer holds {sorted(missing)[:5]}, which no param group of the checkpoint's holds"
                   if missing else "")
                + (f"; the checkpoint's optimizer held {sorted(extra)[:5]}, which this one does not" if extra else "")
                + ". Was it saved from the same model and optimizer? Build the optimizer over the same parameters"
            )
        state.update({pre + k: v for k, v in saved["state"].items()})
    groups = [{**h, "params": [fqn[id(p)] for p in g["params"] if id(p) in fqn]}
              for h, g in zip(matched_groups(optimizer, found), optimizer.param_groups)]
    try:  # not strict: a parameter that never had a gradient has no state to load, as in plain torch
        set_optimizer_state_dict(_holder(stages), optimizer, {"state": state, "param_groups": groups},
                                 options=_options(False, strict=False))
    except (RuntimeError, KeyError, ValueError) as err:
        raise type(err)(re.sub(r"'stage(\d+)\.", r"stage \1 '", str(err))) from err

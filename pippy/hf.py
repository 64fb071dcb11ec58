"""Split helpers for Hugging Face style models: find the repeated blocks, cut into equal layer groups.

Works on any ``nn.Module``; nothing here imports transformers. The repeated blocks of a model are
the elements of its ``nn.ModuleList`` containers whose elements all share one class (GPT-2's
``transformer.h``, BERT's ``bert.encoder.layer``, T5's ``encoder.block`` and ``decoder.block``);
the modules inside a list of lists (Funnel's ``encoder.blocks``); lists that the parent's forward
walks side by side, interleaved into one layer per index (XLM's ``attentions[i]``, ``ffns[i]``;
PoolFormer's ``zip(self.patch_embeddings, self.block)``), in the order the forward's source names
them; the base model's only list even when it mixes classes (Jamba's Mamba and attention layers; Mllama's
self- and cross-attention layers, under the child ``model`` where ``base_model_prefix`` names no child); and
any list of blocks of different classes (a diffusers UNet's ``down_blocks``: ``DownBlock2D``,
``AttnDownBlock2D``), one layer per block, or the block's own layers where it holds block lists.
Lists come in execution order: the order each parent's ``forward`` source first names its children
(the UNet's ``down_blocks``, ``mid_block``, ``up_blocks``), not the order ``__init__`` registered them.

With transformers (not needed here)::

    model = GPT2LMHeadModel(GPT2Config(n_layer=4))
    layer_names(model)[:2]  # ['transformer.h.0', 'transformer.h.1']
    pipe = pippy.pipeline(model, 4, (ids,), split_spec=split_spec_equal_layers(model, 2))

Any model with a block list works the same way:

    >>> import torch, pippy
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.h = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4))
    ...     def forward(self, x):
    ...         for block in self.h:
    ...             x = torch.tanh(block(x))
    ...         return x
    >>> net = Net()
    >>> pipe = pippy.pipeline(net, 2, (torch.randn(4, 4),), split_spec=split_spec_equal_layers(net, 2))
    >>> split_spec_equal_layers(net, 2)
    {'h.1': <SplitPoint.END: 'end'>}
    >>> [sorted({k.rsplit(".", 1)[0] for k in pipe.get_stage_module(s).state_dict()}) for s in range(2)]
    [['h.0', 'h.1'], ['h.2', 'h.3']]
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections.abc import Sequence

from torch import nn

from pippy.frontend.basemodule import base_module
from pippy.frontend.compiled import uncompiled
from pippy.frontend.trace import SplitPoint

__all__ = ["layer_names", "split_spec_equal_layers"]


def _has_params(mod: nn.Module) -> bool:
    return next(iter(mod.parameters()), None) is not None


def _is_block_list(mod: nn.Module, mixed: bool = False) -> bool:
    """At least two distinct modules holding parameters, of one class (of any classes when ``mixed``)."""
    if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2 or len({id(m) for m in mod}) < len(mod):
        return False
    return (mixed or len({type(m) for m in mod}) == 1) and all(_has_params(m) for m in mod)


def _leaves(prefix: str, mod: nn.ModuleList) -> list[tuple[str, nn.Module]]:
    """The modules inside nested ``ModuleList`` s, in order, with their FQNs."""
    out: list[tuple[str, nn.Module]] = []
    for i, child in enumerate(mod):
        name = f"{prefix}.{i}" if prefix else str(i)
        out.extend(_leaves(name, child) if isinstance(child, nn.ModuleList) else [(name, child)])
    return out


class _BlockList:
    """One block list: per element its modules' FQNs (``groups``), and the layers a split may fall between."""

    def __init__(self, name: str, groups: list[list[str]], units: list[list[str]], mixed: bool = False) -> None:
        self.name, self.groups, self.units, self.mixed = name, groups, units, mixed


def _block_list(prefix: str, mod: nn.Module, mixed: bool) -> _BlockList | None:
    """``mod`` as a block list, or ``None``. A list of lists (Funnel's ``blocks``), never called itself, gives its inner
    modules as layers when they share one class, else one layer per inner list (``for attn, ff in self.layers``)."""
    if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
        return None
    name = (prefix + ".") if prefix else ""
    if len(mod) > 0 and all(isinstance(m, nn.ModuleList) for m in mod):
        groups = [[n for n, _ in _leaves(f"{name}{i}", m)] for i, m in enumerate(mod)]
        leaves = _leaves(prefix, mod)
        if _is_block_list(nn.ModuleList(m for _, m in leaves)):
            return _BlockList(prefix, groups, [[n] for n, _ in leaves])
        distinct = len({id(m) for _, m in leaves}) == len(leaves)
        ok = len(groups) >= 2 and all(groups) and distinct and all(_has_params(m) for m in mod)
        return _BlockList(prefix, groups, groups) if ok else None
    if not _is_block_list(mod, mixed):
        return None
    groups = [[f"{name}{i}"] for i in range(len(mod))]
    return _BlockList(prefix, groups, groups)


def _side_by_side(parent: nn.Module, names: list[str]) -> list[list[str]]:
    """Groups of ``names`` (lists of ``parent``) that its forward walks side by side, each in the order it uses them:
    the lists of one ``zip(self.patch_embeddings, self.block)``, and those it indexes (``self.ffns[i]``)."""
    try:
        src = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):
        return []
    groups: list[list[str]] = []
    for args in re.findall(r"zip\(([^()]*)\)", src):
        hits = {n: re.search(rf"self\.{n}\b(?!\.)", args) for n in names}
        where = {n: m.start() for n, m in hits.items() if m}
        if len(where) > 1:
            groups.append(sorted(where, key=where.__getitem__))
    zipped = {n for g in groups for n in g}
    where = {n: src.find(f"self.{n}[") for n in names if n not in zipped and f"self.{n}[" in src}
    return groups + ([sorted(where, key=where.__getitem__)] if len(where) > 1 else [])


def _interleave(model: nn.Module, found: list[_BlockList]) -> list[list[str]]:
    """Merge lists walked side by side (XLM's ``attentions``, ``layer_norm1``, ``ffns``, ``layer_norm2``: one parent,
    one length) into one layer per index, its modules in the order the forward uses them; others stay as they are."""
    units: list[list[str]] = []
    done: set[str] = set()
    for bl in found:
        if bl.name in done:
            continue
        parent, _, short = bl.name.rpartition(".")
        peers = {p.name.rpartition(".")[2]: p for p in found if p.name.rpartition(".")[0] == parent
                 and len(p.groups) == len(bl.groups) and p.name not in done}
        together = _side_by_side(model.get_submodule(parent), list(peers)) if len(peers) > 1 else []
        order = next((g for g in together if short in g), None)
        if order is None:
            units.extend(bl.units)
            done.add(bl.name)
            continue
        units.extend([n for key in order for n in peers[key].groups[k]] for k in range(len(bl.groups)))
        done.update(peers[key].name for key in order)
    return units


def _is_blocks(mod: nn.Module) -> bool:
    """A list of at least two distinct blocks of different classes that hold parameters: each a module made of modules
    (a UNet's ``DownBlock2D`` and ``AttnDownBlock2D``), not one ``Linear`` or norm, nor a list."""
    return _is_block_list(mod, mixed=True) and all(
        next(iter(m.children()), None) is not None and not isinstance(m, nn.ModuleList) for m in mod)


def _uses(cls: type, fn: str, depth: int = 0) -> tuple[str, ...]:
    """The ``self.<name>`` that method ``fn`` of ``cls`` reads, in source order; a method of ``cls`` it calls is read
    where it is called (two levels deep)."""
    try:
        src = inspect.getsource(getattr(cls, fn))
    except (OSError, TypeError, AttributeError):
        return ()
    try:
        tree = ast.parse(textwrap.dedent(src))
    except SyntaxError:
        try:
            tree = ast.parse("if 1:\n" + src)  # a docstring indented less than its method
        except SyntaxError:
            return ()
    defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not defs or not defs[0].args.args:
        return ()
    me = defs[0].args.args[0].arg  # "self", whatever it is called
    reads = sorted((n.lineno, n.col_offset, n.attr) for n in ast.walk(tree)
                   if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == me)
    out: list[str] = []
    for *_, attr in reads:
        if depth < 2 and attr != fn and inspect.isfunction(inspect.getattr_static(cls, attr, None)):
            out.extend(_uses(cls, attr, depth + 1))
        out.append(attr)
    return tuple(out)


def _forward_order(mod: nn.Module, names: list[str]) -> list[str]:
    """Children ``names`` of ``mod`` in the order its ``forward`` first reads them (``self.down_blocks`` before
    ``self.mid_block`` before ``self.up_blocks``, whatever order ``__init__`` registered them in); registration order
    when the forward's source does not name them all (a list, a ``Sequential``, no source)."""
    if len(names) < 2 or isinstance(mod, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
        return names
    first: dict[str, int] = {}
    for i, attr in enumerate(_uses(type(mod), "forward")):
        first.setdefault(attr, i)
    return sorted(names, key=first.__getitem__) if all(n in first for n in names) else names


def _collect(model: nn.Module, name: str, mod: nn.Module, only: nn.Module | None, seen: set[int]) -> list[_BlockList]:
    """The outermost block lists in ``mod``, in execution order. A list of blocks of different classes gives one layer
    per block, or a block's own layers where it holds block lists (a UNet's ``up_blocks.0.resnets``)."""
    if id(mod) in seen:
        return []
    seen.add(id(mod))
    bl = _block_list(name, mod, mixed=mod is only)
    if bl is None and _is_blocks(mod):
        groups, expanded = [], []
        for i, child in enumerate(mod):
            fqn = f"{name}.{i}" if name else str(i)
            inner = _interleave(model, _collect(model, fqn, child, only, seen))
            groups.append([n for unit in inner for n in unit] or [fqn])
            expanded.append(inner)
        # blocks holding layers of their own give those, the others one layer each; but blocks holding none before
        # the first such block or after the last (an embedding or a head around a stack) go with their neighbours,
        # as embeddings and heads do elsewhere
        full = [k for k, inner in enumerate(expanded) if inner]
        keep = range(full[0], full[-1] + 1) if full else range(len(groups))
        units = [u for k in keep for u in (expanded[k] or [[groups[k][0]]])]
        bl = _BlockList(name, groups, units, mixed=True)
    if bl is not None:
        seen.update(id(m) for m in mod.modules())
        return [bl]
    found = {c: _collect(model, f"{name}.{c}" if name else c, child, only, seen) for c, child in mod.named_children()}
    return [bl for c in _forward_order(mod, [c for c, f in found.items() if f]) for bl in found[c]]


def _layer_units(model: nn.Module) -> list[list[str]]:
    """The model's layers in execution order, each the FQNs of the modules it is made of (a ``torch.compile``'d
    model's as the model's own, the names pipeline() gives its stages)."""
    model = uncompiled(model)
    base = base_module(model) or model  # Mllama's text model: base_model_prefix names no child; `model` is the base
    own_lists = [m for m in base.children() if isinstance(m, nn.ModuleList) and len(m) >= 2]
    only = own_lists[0] if len(own_lists) == 1 else None  # may mix block classes (Jamba's mamba and attention layers)
    found = _collect(model, "", model, only, set())
    # a list of mixed blocks counts unless its layers are small beside those of the lists of one class: a UNet's
    # down_blocks count beside its mid_block.resnets, not wav2vec2's feature_extractor.conv_layers (about 0.6M
    # parameters a layer) beside encoder.layers (7M): they would count as much as transformer layers
    plain = [_unit_size(model, u) for bl in found if not bl.mixed for u in bl.units]
    if plain:
        typical = sum(plain) / len(plain)
        found = [bl for bl in found if not bl.mixed or
                 4 * sum(_unit_size(model, u) for u in bl.units) >= typical * len(bl.units)]
    return _interleave(model, found)


def _unit_size(model: nn.Module, unit: list[str]) -> int:
    """The parameters of one layer (its modules' FQNs), each counted once."""
    params = {id(p): p.numel() for n in unit for p in model.get_submodule(n).parameters()}
    return sum(params.values())


def layer_names(model: nn.Module) -> list[str]:
    """FQNs of the model's repeated blocks, in execution order as far as it can be told without running it.

    A block list is an ``nn.ModuleList`` or ``nn.Sequential`` (the model itself too) of at least two
    distinct modules of one class that hold parameters; nested lists inside a block (e.g. T5's ``layer`` inside each ``block``) are skipped.
    A list of lists (Funnel's ``blocks``) gives the modules inside; lists indexed side by side in
    their parent's forward (XLM's ``attentions[i]``, ``ffns[i]``) are interleaved by layer; the base
    model's only list may mix block classes (Jamba). A list of blocks of different classes, each made
    of modules (not one ``Linear``), gives one layer per block, or the block's own layers where it
    holds block lists (a UNet's ``up_blocks.0.resnets``); blocks holding none before the first or after the
    last that does (an embedding and a head around a stack: ``down.1`` and ``up.0`` below) go with their
    neighbours, and such a list is left out where its layers are small beside those of the model's lists
    of one class (wav2vec2's convolutions beside its transformer layers). A module's lists come in the order its
    ``forward`` source first names them (``self.<name>``, also inside the methods of ``self`` it calls),
    in registration order where the source does not name them all. Shared layers called several times (ALBERT)
    are not listed, since one module cannot sit in two stages: split such models at other names.

        >>> import torch
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
        >>> layer_names(torch.nn.ModuleDict({"h": blocks}))
        ['h.0', 'h.1', 'h.2']
        >>> layer_names(torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(3))))
        ['0', '1', '2']
        >>> class Parallel(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.attn = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(2))
        ...         self.norm = torch.nn.ModuleList(torch.nn.LayerNorm(2) for _ in range(2))
        ...     def forward(self, x):
        ...         for i in range(2):
        ...             x = self.attn[i](x)
        ...             x = self.norm[i](x)
        ...         return x
        >>> layer_names(Parallel())
        ['attn.0', 'norm.0', 'attn.1', 'norm.1']
        >>> class Unet(torch.nn.Module):  # registered up before down; blocks of two classes
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.up = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(2, 2)), Parallel()])
        ...         self.down = torch.nn.ModuleList([Parallel(), torch.nn.Sequential(torch.nn.Linear(2, 2))])
        ...     def forward(self, x):
        ...         for block in [*self.down, *self.up]:
        ...             x = block(x)
        ...         return x
        >>> layer_names(Unet())
        ['down.0.attn.0', 'down.0.norm.0', 'down.0.attn.1', 'down.0.norm.1', 'up.1.attn.0', 'up.1.norm.0', 'up.1.attn.1', 'up.1.norm.1']
    """
    return [n for unit in _layer_units(model) for n in unit]


def split_spec_equal_layers(
    model: nn.Module, n_stages: int, layers: Sequence[str] | str | None = None
) -> dict[str, SplitPoint]:
    """A ``split_spec`` giving ``n_stages`` stages of (nearly) equal layer count.

    ``layers`` is the ordered list of module names to balance over (default: the layers of
    :func:`layer_names`, a split falling after the last module of a layer made of side-by-side
    lists), or the name of one ``ModuleList``. Embeddings go with the first group and heads with the
    last; when the count does not divide evenly the earlier stages get one layer more.

        >>> import torch
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
        >>> split_spec_equal_layers(torch.nn.ModuleDict({"h": blocks}), 2)
        {'h.1': <SplitPoint.END: 'end'>}
    """
    if not isinstance(n_stages, int) or n_stages < 1:
        raise ValueError(f"n_stages must be a positive int, got {n_stages!r}")
    units: list[list[str]]
    if isinstance(layers, str):
        try:
            container = model.get_submodule(layers)
        except AttributeError:
            raise ValueError(f"{layers!r} names no submodule of {type(model).__name__}") from None
        given = _block_list(layers, container, mixed=True)
        units = given.units if given else [[f"{layers}.{k}"] for k, _ in container.named_children()]
    elif layers is None:
        units = _layer_units(model)
    else:
        units = [[n] for n in layers]
        for n in layers:
            try:
                model.get_submodule(n)
            except AttributeError:
                raise ValueError(f"{n!r} names no submodule of {type(model).__name__}") from None
    if not units:
        raise ValueError(
            f"found no repeated blocks in {type(model).__name__}; pass layers=[module names in forward order] "
            "(e.g. from model.named_modules())"
        )
    if n_stages > len(units):
        raise ValueError(
            f"cannot make {n_stages} stages from {len(units)} layers ({units[0][0]} .. {units[-1][-1]}); "
            f"use at most {len(units)} stages"
        )
    base, extra = divmod(len(units), n_stages)
    spec: dict[str, SplitPoint] = {}
    end = 0
    for s in range(n_stages - 1):
        end += base + (1 if s < extra else 0)
        spec[units[end - 1][-1]] = SplitPoint.END  # after the layer's last module
    return spec

"""The package's shape: layers import downwards only, no import circle, and the stage is a leaf."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "pippy"
# low -> high; anything else (the public faces: __init__, pipe, cli, hf, checkpoint, ...) is on top
LAYERS = {"schedules": 0, "microbatch": 0, "frontend": 1, "sim": 2, "runtime": 3}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the pippy modules it imports anywhere (function bodies too), TYPE_CHECKING blocks excluded."""
    edges: dict[str, set[str]] = {}
    for name, f in mods.items():
        tree = ast.parse(f.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                for b in node.body for n in ast.walk(b)}
        found: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                targets = [a.name for a in node.names]
            for t in targets:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t not in (name, "pippy"):
                    found.add(t)
        edges[name] = found
    return edges


def _layer(mod: str) -> int:
    parts = mod.split(".")
    return LAYERS.get(parts[1], 4) if len(parts) > 1 else 4


def test_layers_import_downwards_only() -> None:
    edges = _imports(_modules())
    upward = sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs if _layer(b) > _layer(a) < 4)
    assert upward == []


def test_no_import_circle() -> None:
    edges = _imports(_modules())
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(n):], n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_stage_is_a_leaf() -> None:
    """stage.py knows no schedule, executor or driver; the schedule layer knows no torch.distributed."""
    edges = _imports(_modules())
    leaves = {"pippy.runtime.wgrad", "pippy.runtime.stagebackward", "pippy.runtime.stageerror"}  # its own parts
    for mod in ("pippy.runtime.stage", *leaves):
        assert not {m for m in edges[mod] if m.startswith("pippy.runtime.")} - leaves, mod
    for mod, deps in edges.items():
        if _layer(mod) == 0:
            assert all(_layer(d) == 0 for d in deps), mod
    schedules_src = "".join(f.read_text() for f in (PKG / "schedules").glob("*.py"))
    assert "torch" not in schedules_src.replace("torchgpipe", "")

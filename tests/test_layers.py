"""Imports point downward only (docs/architecture.md): parsed from the source, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "diffmis"

# module (or package) -> layer; a module may import its own layer or lower ones
LAYERS = {
    "errors": 1, "allocator": 1, "hardware": 1, "config": 1, "registry": 1, "utils": 1, "__init__": 1, "__main__": 7,
    "schedulers": 2,
    "models": 3,
    "data": 4, "losses": 4, "metrics": 4,
    "sampling": 5, "ensemble": 5, "diffusion": 5,
    "training": 6, "inference": 6, "evaluation": 6, "report": 6, "quickstart": 6, "benchmarking": 6,
    "cli": 7,
}


def _layer(module: str) -> int:
    head = module.split(".")[1] if module.startswith("diffmis.") else module
    return LAYERS[head]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("diffmis.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffmis.") and node.level == 0:
            out.append(node.module)
    return out


FILES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_downward(path):
    rel = path.relative_to(SRC)
    own = _layer(rel.parts[0].removesuffix(".py"))
    for mod in _imports(path):
        assert _layer(mod) <= own, f"{rel} (layer {own}) imports {mod} (layer {_layer(mod)})"


def test_library_never_imports_cli():
    for path in FILES:
        if path.relative_to(SRC).parts[0] in ("cli", "__main__.py"):
            continue
        assert not any(m.startswith("diffmis.cli") for m in _imports(path)), path

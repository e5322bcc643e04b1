"""The structure of the package (docs/architecture.md), parsed from the source: nothing is imported.

* imports point downward only (a module may import its own layer or lower ones), function-level imports included;
* there is no import cycle between modules;
* training and inference are siblings: neither imports the other;
* the trainer and the predictor know methods only through the Method interface: no method names, no isinstance
  on method classes, no recipe comparisons;
* the library never imports the CLI.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "diffmis"

# module (or package) -> layer; a module may import its own layer or lower ones
LAYERS = {
    "errors": 1, "allocator": 1, "hardware": 1, "config": 1, "registry": 1, "utils": 1, "masks": 1, "__init__": 1,
    "schedulers": 2,
    "models": 3,
    "data": 4, "losses": 4, "metrics": 4,
    "sampling": 5, "cuda_graphs": 5, "ensemble": 5, "checkpoint": 5, "windows": 5, "calibration": 5,
    "methods": 6,
    "training": 7, "inference": 7, "evaluation": 7, "report": 7,
    "benchmarking": 8, "quickstart": 8,
    "cli": 9, "__main__": 9,
}

FILES = sorted(p for p in SRC.rglob("*.py"))


def _module(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = ["diffmis", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in FILES}


def _layer(module: str) -> int:
    head = module.split(".")[1] if module.startswith("diffmis.") else "__init__"
    return LAYERS[head]


def _imports(path: Path) -> list[str]:
    """Every ``diffmis.*`` module ``path`` imports, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("diffmis.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffmis") and node.level == 0:
            # "from diffmis.methods import hidiff" imports the submodule diffmis.methods.hidiff
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            out += subs or [node.module]
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_downward(path):
    rel = path.relative_to(SRC)
    own = _layer(_module(path))
    for mod in _imports(path):
        assert _layer(mod) <= own, f"{rel} (layer {own}) imports {mod} (layer {_layer(mod)})"


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if m != "diffmis" and m.split(".")[1] not in LAYERS]


def test_no_import_cycle():
    graph = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_training_and_inference_do_not_import_each_other():
    for sub, other in (("training", "inference"), ("inference", "training")):
        for path in (SRC / sub).rglob("*.py"):
            bad = [m for m in _imports(path) if m == f"diffmis.{other}" or m.startswith(f"diffmis.{other}.")]
            assert not bad, f"{path.relative_to(SRC)} imports {bad}"


METHOD_WORDS = re.compile(r"isinstance\(.*Method|recipe ==|hidiff|pd_ddpm|berdiff|medsegdiff|refiner", re.IGNORECASE)


def test_trainer_and_predictor_know_no_method_by_name():
    for sub in ("training", "inference"):
        for path in (SRC / sub).rglob("*.py"):
            lines = path.read_text(encoding="utf-8").splitlines()
            hits = [f"{path.relative_to(SRC)}:{i}: {line.strip()}" for i, line in enumerate(lines, 1)
                    if METHOD_WORDS.search(line)]
            assert not hits, "\n".join(hits)


def test_library_never_imports_cli():
    for path in FILES:
        if path.relative_to(SRC).parts[0] in ("cli", "__main__.py"):
            continue
        assert not any(m.startswith("diffmis.cli") for m in _imports(path)), path

"""The package's layers, read off its folders: every import points down (or stays in its own
subpackage), and the subpackages form no cycle.  An AST walk over every ``import`` in the package,
module level and inside functions alike."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "convfactor"

#: bottom to top; an import may point to its own layer or below, never above
LAYERS: list[set[str]] = [
    {"utils", "files", "models", "data"},   # leaves
    {"spec"},                           # 1. what a conv is: ConvSpec, make_conv, im2col
    {"methods"},                        # 2. one module per method
    {"compression", "io", "export", "quantize"},   # 3. rules, surgery, compress, inspect, calibration; save/load/export/int8
    {"measure"},                        # 4. count, timing, quality (the planner measures, so it sits below rank)
    {"rank"},                           # 5. criteria, budget, latency table, planner, plan files
    {"train"},                          # 6. fine-tuning, distillation, checkpoints, DDP
    {"report", "recipes"},              # 7. workflow recipes (the demo pipeline) and their reports
    {"commands", "cli"},                # 8. the thin CLI
]
LAYER_OF = {name: i for i, group in enumerate(LAYERS) for name in group}


def _unit(module: str) -> str:
    """``convfactor.rank.planner`` -> ``rank``; ``convfactor.io`` -> ``io``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``path``, relative ones resolved."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1])         # a module's package; an __init__ is its own package
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or target == "convfactor":
                found += [(f"{target}.{a.name}", node.lineno) for a in node.names]
            else:
                found.append((target, node.lineno))
    return [(t, line) for t, line in found if t.split(".")[0] == "convfactor"]


def _edges() -> list[tuple[str, str, str]]:
    """(source unit, target unit, where) for every import that crosses subpackages."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _unit(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if source == "__init__":        # the top-level lazy export table
            continue
        for target, line in _imports(path):
            unit = _unit(target)
            if unit != source and unit != "__init__":
                edges.append((source, unit, f"{path.relative_to(PACKAGE.parent)}:{line}"))
    return edges


def test_every_subpackage_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert units - set(LAYER_OF) == set(), "add the new subpackage to LAYERS"


def test_imports_point_down():
    upward = [f"{where}: {s} (layer {LAYER_OF[s]}) imports {t} (layer {LAYER_OF[t]})"
              for s, t, where in _edges() if LAYER_OF[t] > LAYER_OF[s]]
    assert upward == []


def test_no_package_cycles():
    graph: dict[str, set[str]] = {}
    for s, t, _ in _edges():
        graph.setdefault(s, set()).add(t)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted(u for u in graph if reaches(u, u, set()))
    assert cycles == []


@pytest.mark.parametrize("source,target", [("methods", "compression"), ("spec", "methods"), ("rank", "train")])
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, source, target):
    """The walk sees a function-level upward import (the kind that hid the old core/ cycle)."""
    fake = tmp_path / "convfactor"
    (fake / source).mkdir(parents=True)
    (fake / source / "x.py").write_text(f"def f():\n    from ..{target} import y\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert any(s == source and t == target for s, t, _ in _edges())

"""No private name crosses modules inside the package: no ``from convfactor.x import _name`` (relative
imports alike) and no ``module._name`` on an imported convfactor module, from any other module.  A
name two modules share is public in the module that owns it.  An AST walk over every file, module
level and inside functions alike; third-party privates (``torch.utils._pytree``) are not checked."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "convfactor"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _target(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of ``from ... import``, relative ones resolved against ``package``."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = parts[:len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attribute accesses on a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _module_aliases(tree: ast.AST, package: str) -> dict[str, str]:
    """Local name -> the convfactor module it is bound to (``import``, ``import as``, ``from . import m``)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "convfactor":
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "convfactor"
        elif isinstance(node, ast.ImportFrom):
            target = _target(node, package)
            for a in node.names:
                if target.split(".")[0] == "convfactor" and _is_module(f"{target}.{a.name}"):
                    aliases[a.asname or a.name] = f"{target}.{a.name}"
    return aliases


def crossings(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, what)`` for every private name of another convfactor module that ``source`` (the
    module ``module``; ``is_package`` for an ``__init__``) imports or reads as an attribute."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _target(node, package)
            if target.split(".")[0] == "convfactor" and target != module:
                found += [(node.lineno, f"from {target} import {a.name}") for a in node.names if _private(a.name)]
    aliases = _module_aliases(tree, package)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = _dotted(node.value)
            head, _, rest = (base or "").partition(".")
            if head in aliases:
                owner = aliases[head] + (f".{rest}" if rest else "")
                if owner != module and _is_module(owner):
                    found.append((node.lineno, f"{owner}.{node.attr}"))
    return sorted(found)


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def test_no_private_name_crosses_modules():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, is_package = _module_name(path)
        problems += [f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
                     for line, what in crossings(path.read_text(), module, is_package=is_package)]
    assert not problems, "private names used across modules (make them public where they belong):\n" + \
        "\n".join(problems)


def test_the_checker_catches_planted_crossings_and_nothing_else():
    planted = "\n".join([
        "from .api import _si, capture_layer_io",                  # 1: a private name, relative
        "from convfactor.data.sr import _augment",                 # 2: absolute
        "import convfactor.spec.convspec as cs",                   # 3
        "from ..data import sr",                                   # 4
        "from torch.nn.modules.batchnorm import _BatchNorm",       # 5: third party: allowed
        "from ..spec.convspec import PAD_MODES, __all__",          # 6: public and dunder: allowed
        "def f(self):",                                            # 7
        "    from .api import _tokens",                            # 8: inside a function
        "    return cs._PAD_MODES, sr._SeededPatches, self._x",    # 9: two module attributes; self is fine
        "import convfactor",                                       # 10
        "convfactor.compression.api._si",                          # 11: through the package
        "from . import timing",                                    # 12
        "timing._HOOI_SWEEPS",                                     # 13
    ])
    found = crossings(planted, "convfactor.compression.inspect")
    assert found == [(1, "from convfactor.compression.api import _si"),
                     (2, "from convfactor.data.sr import _augment"),
                     (8, "from convfactor.compression.api import _tokens"),
                     (9, "convfactor.data.sr._SeededPatches"),
                     (9, "convfactor.spec.convspec._PAD_MODES"),
                     (11, "convfactor.compression.api._si"),
                     (13, "convfactor.compression.timing._HOOI_SWEEPS")]
    # a module's own private names, read through its own package, are its business
    assert crossings("from . import inspect\ninspect._x\nfrom .inspect import _y", "convfactor.compression.inspect") == []

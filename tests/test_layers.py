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
    {"compression", "io", "export", "quantize", "openvino_runtime"},   # 3. compression; save/load/export/int8/OpenVINO
    {"measure"},                        # 4. count, timing, quality (the planner measures, so it sits below rank)
    {"rank"},                           # 5. criteria, budget, latency table, planner, plan files
    {"train"},                          # 6. fine-tuning, distillation, checkpoints, DDP
    {"report", "recipes"},              # 7. workflow recipes (the demo pipeline) and their reports
    {"commands", "cli", "__main__"},    # 8. the thin CLI (and python -m convfactor)
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


# The package stays inside itself: nothing in convfactor/ edits sys.path, loads a module from outside
# the package by name or by file, or runs a Python script held in a string (``python -c``).  The
# benchmarks and other checkout-only code are run as modules from the checkout (``python -m benchmarks``).

#: the functions whose importlib loads take a name from the user or from the package's own table
#: (``file:function``); any other load must name a convfactor module, literally or by ``__name__``.
DYNAMIC_LOADS = {
    "convfactor/__init__.py:__getattr__",               # the lazy export table; its values are convfactor modules
    "convfactor/models/thirdparty.py:import_library",   # the optional peers torchvision / timm, named by the zoo
    "convfactor/models/thirdparty.py:_factory",         # a user's 'package.module:factory' model spec
}
#: loads by name: the first argument (or ``name=``) says which module
_LOAD_BY_NAME = {"import_module", "__import__"}
#: loads by file location: never from inside the package (its modules are imported by name)
_LOAD_BY_FILE = {"spec_from_file_location", "run_path"}
_SYS_PATH_MUTATORS = {"insert", "append", "extend", "remove", "pop", "clear", "__setitem__", "__iadd__"}


def _walk_with_function(tree: ast.AST):
    """(node, name of the innermost enclosing def, or '<module>') for every node of ``tree``."""
    stack = [(tree, "<module>")]
    while stack:
        node, where = stack.pop()
        yield node, where
        inner = node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def _package_files() -> list[tuple[str, ast.AST]]:
    return [(str(p.relative_to(PACKAGE.parent)), ast.parse(p.read_text())) for p in sorted(PACKAGE.rglob("*.py"))]


def _is_sys_path(node: ast.AST, sys_names: set[str]) -> bool:
    """``sys.path`` (``sys`` under any of ``sys_names``), or an item or slice of it."""
    if isinstance(node, ast.Subscript):
        node = node.value
    return isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
        and node.value.id in sys_names


def _sys_path_edit(node: ast.AST, sys_names: set[str]) -> str | None:
    """What ``node`` does to ``sys.path`` (a mutating call, an assignment, a del, ``from sys import path``)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr in _SYS_PATH_MUTATORS and _is_sys_path(node.func.value, sys_names):
            return f"sys.path.{node.func.attr}(...)"
        if node.func.attr == "addsitedir":
            return "site.addsitedir(...)"
    targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else \
        [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
    if any(_is_sys_path(t, sys_names) for t in targets):
        return f"sys.path changed by {type(node).__name__.lower()}"
    if isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
        return "from sys import path"
    return None


def _sys_path_edits() -> list[str]:
    found = []
    for file, tree in _package_files():
        sys_names = {"sys"} | {a.asname for node in ast.walk(tree) if isinstance(node, ast.Import)
                               for a in node.names if a.name == "sys" and a.asname}
        found += [f"{file}:{node.lineno}: {what}" for node in ast.walk(tree)
                  if (what := _sys_path_edit(node, sys_names))]
    return found


def _inside(name: ast.AST) -> bool | None:
    """True for a literal convfactor (or relative) module name, False for a literal outside name,
    None for a name computed at run time."""
    if isinstance(name, ast.Constant) and isinstance(name.value, str):
        return name.value == "convfactor" or name.value.startswith(("convfactor.", "."))
    if isinstance(name, ast.JoinedStr) and name.values:
        head = name.values[0]
        if isinstance(head, ast.Constant):          # f"convfactor.x.{name}" is inside, f"numpy.{name}" outside
            return True if head.value.startswith(("convfactor.", ".")) else False if "." in head.value else None
        if isinstance(head, ast.FormattedValue) and isinstance(head.value, ast.Name):
            return True if head.value.id in ("__name__", "__package__") else None
    return None


def _load(node: ast.AST) -> tuple[str, ast.AST | None] | None:
    """(function, its module-name argument) of an importlib / __import__ / runpy load, else None."""
    if not isinstance(node, ast.Call):
        return None
    fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
    if fn not in _LOAD_BY_NAME | _LOAD_BY_FILE:
        return None
    name = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
    return fn, name


def _loads() -> list[tuple[str, str, int, str]]:
    """(file, function, line, why) for every load that may reach outside the package."""
    found = []
    for file, tree in _package_files():
        for node, where in _walk_with_function(tree):
            load = _load(node)
            if load is None:
                continue
            fn, name = load
            inside = None if name is None else _inside(name)
            if fn in _LOAD_BY_FILE:
                found.append((file, where, node.lineno, f"{fn}: a load by file location"))
            elif inside is False:
                found.append((file, where, node.lineno, f"{fn} of the outside module {ast.unparse(name)}"))
            elif inside is None:
                found.append((file, where, node.lineno, f"{fn} of a name computed at run time"))
    return found


def _outside_loads() -> list[str]:
    return [f"{file}:{line} ({where}): {why}" for file, where, line, why in _loads()
            if not (why.endswith("run time") and f"{file}:{where}" in DYNAMIC_LOADS)]


def _script_strings() -> list[str]:
    """Every argv list or tuple holding ``"-c"`` (a Python script in a string handed to a subprocess)."""
    return [f"{file}:{node.lineno}: {ast.unparse(node)[:80]}" for file, tree in _package_files()
            for node in ast.walk(tree) if isinstance(node, (ast.List, ast.Tuple))
            and any(isinstance(e, ast.Constant) and e.value == "-c" for e in node.elts)]


def test_no_sys_path_edits():
    assert _sys_path_edits() == []


def test_no_loads_of_outside_modules():
    """Dynamic loads only where the name is the user's or the package's own (DYNAMIC_LOADS)."""
    assert _outside_loads() == []


def test_every_allowed_dynamic_load_is_still_there():
    """An entry of DYNAMIC_LOADS whose load is gone (or renamed) is removed, not left to cover a new one."""
    used = {f"{file}:{where}" for file, where, _, why in _loads() if why.endswith("run time")}
    assert DYNAMIC_LOADS - used == set()


def test_no_script_strings_for_subprocesses():
    """A fresh process runs a real module (``python -m convfactor.x``), never ``python -c SCRIPT``."""
    assert _script_strings() == []


def _plant(tmp_path, monkeypatch, relpath: str, source: str) -> None:
    fake = tmp_path / "convfactor"
    (fake / relpath).parent.mkdir(parents=True, exist_ok=True)
    (fake / relpath).write_text(source)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)


@pytest.mark.parametrize("line", ["sys.path.insert(0, '/checkout')", "sys.path.append(root)", "sys.path.extend(roots)",
                                  "sys.path = [root, *sys.path]", "sys.path[:0] = [root]", "sys.path += [root]",
                                  "site.addsitedir(root)", "_sys.path.insert(0, root)"])
def test_the_check_catches_a_sys_path_edit(tmp_path, monkeypatch, line):
    _plant(tmp_path, monkeypatch, "commands/x.py", f"import site, sys\nimport sys as _sys\n\ndef run(root, roots):\n"
                                                   f"    {line}\n")
    assert len(_sys_path_edits()) == 1


@pytest.mark.parametrize("call", ["importlib.import_module('benchmarks.runner')", "import_module('numpy')",
                                  "__import__('benchmarks')", "importlib.import_module(f'benchmarks.{spec}')",
                                  "importlib.import_module(name='benchmarks')",
                                  "importlib.util.spec_from_file_location('convfactor.x', spec)",
                                  "runpy.run_path(spec)"])
def test_the_check_catches_an_outside_load(tmp_path, monkeypatch, call):
    """A literal outside name, or any load by file, is caught even inside an allow-listed function."""
    _plant(tmp_path, monkeypatch, "models/thirdparty.py", f"import importlib\n\ndef _factory(spec):\n    {call}\n")
    assert len(_outside_loads()) == 1


@pytest.mark.parametrize("where", [("models/thirdparty.py", "elsewhere"), ("models/other.py", "_factory")])
def test_the_check_catches_a_computed_name_outside_the_allow_list(tmp_path, monkeypatch, where):
    """The allow-list is per file *and* function: the same load one function or one file over is caught."""
    path, function = where
    _plant(tmp_path, monkeypatch, path, f"import importlib\n\ndef {function}(name):\n"
                                        "    return importlib.import_module(name)\n")
    assert [why for *_, why in _loads()] == ["import_module of a name computed at run time"]
    assert len(_outside_loads()) == 1


@pytest.mark.parametrize("call", ["importlib.import_module('convfactor.io')",
                                  "importlib.import_module(f'{__name__}.x')",
                                  "importlib.import_module(f'convfactor.commands.{name}')",
                                  "importlib.import_module('.x', __package__)"])
def test_the_check_lets_the_package_load_its_own_modules(tmp_path, monkeypatch, call):
    _plant(tmp_path, monkeypatch, "cli.py", f"import importlib\n\ndef f(name):\n    {call}\n")
    assert _outside_loads() == []


def test_the_allow_list_covers_a_users_model_spec(tmp_path, monkeypatch):
    _plant(tmp_path, monkeypatch, "models/thirdparty.py", "import importlib\n\ndef _factory(spec):\n"
                                                          "    return importlib.import_module(spec)\n")
    assert _outside_loads() == [] and len(_loads()) == 1


@pytest.mark.parametrize("argv", ["[sys.executable, '-c', SCRIPT, arg]", "(sys.executable, '-c', SCRIPT)"])
def test_the_check_catches_a_script_string(tmp_path, monkeypatch, argv):
    _plant(tmp_path, monkeypatch, "measure/x.py", f"import subprocess, sys\nSCRIPT = 'print(1)'\n\ndef f(arg):\n"
                                                  f"    subprocess.run({argv}, check=True)\n")
    assert len(_script_strings()) == 1

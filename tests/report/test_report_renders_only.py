"""The renderer only renders: ``convfactor.report`` imports no measuring code (no speed comparison, no
compression, no counting) and calls no clock; the numbers it shows come from the data dict it is
given (:func:`convfactor.measure.report_data.collect` and the recipes measure them)."""
import ast
import subprocess
import sys
from pathlib import Path

import convfactor

REPORT = Path(convfactor.__file__).resolve().parent / "report"
#: what the report package may import from convfactor: itself and the leaf helpers
ALLOWED = ("convfactor.report", "convfactor.files", "convfactor.utils")
MEASURING_NAMES = {"compare_speed", "capture_layer_io", "collect", "count", "layer_facts", "float_psnr"}


def _convfactor_imports(path: Path) -> list[str]:
    """Every convfactor module ``path`` imports (module level and inside functions), relative ones resolved."""
    package = ["convfactor", "report"]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [f"{module}.{a.name}" for a in node.names]
    return [m for m in found if m.split(".")[0] == "convfactor"]


def test_report_modules_import_no_measuring_code():
    files = sorted(REPORT.glob("*.py"))
    assert {"__init__.py", "render.py", "figures.py"} <= {f.name for f in files}
    bad = [f"{f.name}: {m}" for f in files for m in _convfactor_imports(f) if not m.startswith(ALLOWED)]
    assert bad == []


def test_report_modules_call_no_measurement():
    used = {f"{f.name}: {node.id if isinstance(node, ast.Name) else node.attr}"
            for f in sorted(REPORT.glob("*.py")) for node in ast.walk(ast.parse(f.read_text()))
            if isinstance(node, (ast.Name, ast.Attribute))
            and (node.id if isinstance(node, ast.Name) else node.attr) in MEASURING_NAMES}
    assert used == set()


def test_importing_report_loads_no_measuring_module():
    code = ("import sys, convfactor.report, convfactor.report.render, convfactor.report.figures; "
            "print(sorted(m for m in sys.modules if m.startswith(('convfactor.measure', 'convfactor.compression', "
            "'convfactor.methods', 'convfactor.rank', 'convfactor.train'))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"

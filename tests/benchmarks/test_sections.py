"""The section contract: every listed section is a Section, benchmarks/ reaches convfactor only
through public names, and a section's Markdown is rendered from its measured data alone."""
import ast
import importlib
from pathlib import Path

import pytest

import benchmarks as bench
from benchmarks import experiments
from benchmarks.markdown import row, table
from benchmarks.section import Section

BENCHMARKS = Path(bench.__file__).resolve().parent


@pytest.mark.parametrize("name", bench.SECTIONS)
def test_every_listed_section_is_a_section_named_after_its_module(name):
    section = bench.load_section(name)
    module = importlib.import_module(f"benchmarks.{name}")
    assert isinstance(section, Section) and section.name == name
    assert section.title == module.TITLE and callable(section.measure) and callable(section.render)


def test_an_unknown_section_is_a_clear_error():
    with pytest.raises(ValueError, match="no such section 'nope'"):
        bench.load_section("nope")
    with pytest.raises(ValueError, match="unknown experiment"):
        experiments.run_one("nope")


def test_experiments_are_sections_too():
    assert all(isinstance(e, Section) and e.name == n for n, e in experiments.EXPERIMENTS.items())


def _convfactor_imports(path: Path):
    """(module, imported name or None, line) of every import of convfactor in ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("convfactor"):
            for alias in node.names:
                yield node.module, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("convfactor"):
                    yield alias.name, None, node.lineno


def test_benchmarks_use_only_public_convfactor_names():
    bad = []
    for path in sorted(BENCHMARKS.glob("*.py")):
        for module, name, line in _convfactor_imports(path):
            private = any(part.startswith("_") for part in module.split(".")) or (name or "").startswith("_")
            if private or module.startswith("convfactor.commands") or module == "convfactor.cli":
                bad.append(f"{path.name}:{line}: {module}" + (f" import {name}" if name else ""))
    assert not bad, "benchmarks/ must use convfactor's public API:\n" + "\n".join(bad)


def test_sections_do_not_import_each_others_private_names():
    bad = [f"{path.name}:{node.lineno}: {alias.name}"
           for path in sorted(BENCHMARKS.glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
           if isinstance(node, ast.ImportFrom) and node.level == 1
           for alias in node.names if alias.name.startswith("_")]
    assert not bad, bad


def test_markdown_table_writes_empty_cells_and_the_separator():
    assert row(["a", 1, ""]) == "| a | 1 | |"
    assert table(["x", "y"], [[1, 2]]) == ["| x | y |", "|---|---|", "| 1 | 2 |"]


def test_render_needs_only_the_measured_data():
    from benchmarks import layers
    shape = "16->16 3x3 @16²"
    rows = [layers.Row("cp", shape, 2, (8,), 2.0, 1.0, "contiguous", 0.5, "folded, channels_last"),
            layers.Row("cp", shape, 4, (4,), 4.0, 1.0, "contiguous", 0.4, "separable, contiguous")]
    text = layers.render(layers.Results(rows, {"cpu": "test"}, (2, 4, 8)))
    assert text.startswith(f"## {layers.TITLE}\n")
    assert f"| cp | {shape} | 2x | 8 | 2.00x | 1.000 (contiguous) | 0.500 (folded, channels_last) | 2.00x | 1.00 |" in text
    assert "| cp | 1.00 | 0.62 | - |" in text                    # median efficiency per ratio; none measured at 8x
    assert f"| {shape} | cp (separable, contiguous) | 2.50x | 0.62 |" in text


def test_section_run_renders_what_measure_returns():
    calls = []
    section = Section("demo", "Demo", measure=lambda quick: calls.append(quick) or {"n": 3},
                      render=lambda data: f"## Demo\n\nn = {data['n']}\n")
    assert section.run(quick=True) == "## Demo\n\nn = 3\n" and calls == [True]

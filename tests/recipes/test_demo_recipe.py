"""``convfactor demo`` is argument parsing, one library call (:func:`convfactor.recipes.demo.run_demo`) and
printing; the report's assembly lives in the recipe (the end-to-end runs are tests/test_demo.py and
tests/recipes/test_honest_outcome.py)."""
import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from convfactor.commands import demo as command
from convfactor.recipes.demo import EXIT_CODES, DemoRun, run_demo


def test_the_command_imports_only_the_recipe():
    tree = ast.parse(Path(command.__file__).read_text())
    imported = {("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"__future__", "pathlib", "..recipes.demo", "..recipes.pipeline", ".common"}
    assert command.run_demo is run_demo
    assert not any(hasattr(command, name) for name in ("build_report_data", "image_crops", "format_summary",
                                                        "frontier_data", "report_headline", "EXIT_CODES"))


@pytest.mark.parametrize("kind", sorted(EXIT_CODES))
def test_exit_code_by_verdict_and_quick(kind):
    result = SimpleNamespace(verdict=SimpleNamespace(kind=kind))
    assert DemoRun(result, [], {}, Path("model")).exit_code == EXIT_CODES[kind]
    assert DemoRun(result, [], {}, Path("model"), quick=True).exit_code == 0       # its numbers mean nothing
    assert EXIT_CODES[kind] == (0 if kind == "met" else 1 if kind == "slower" else 3)


def test_run_demo_checks_its_output_before_any_work(tmp_path):
    from convfactor.recipes.pipeline import PipelineConfig
    with pytest.raises(OSError, match="does not exist"):
        run_demo(PipelineConfig(), tmp_path / "no" / "such" / "dir")    # fails at once, nothing measured

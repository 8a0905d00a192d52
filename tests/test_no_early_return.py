"""No test can pass by returning early: an AST walk over every ``tests/**/*.py`` flags a bare ``return``
(or ``return None``) in a test function, in a checking helper (``check_*`` / ``_check*``), or in a
module-level helper that a test of the same file calls and that never returns a value (a procedure).
Such a return turns whatever it skips (a refused layer, a missing library) into a silent pass; draw
only valid inputs, or ``pytest.skip`` with a reason, instead.  Functions nested in another function
(closures, hooks, forward methods of local modules) are left alone: their return is a value.
"""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent

#: name prefixes of the functions that check things (besides pytest's ``test_``)
CHECKING = ("test_", "check_", "_check")


def _own_nodes(func: ast.AST):
    """The nodes of ``func``'s body, not descending into nested functions, lambdas or classes."""
    stack = list(ast.iter_child_nodes(func))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _is_bare(node: ast.AST) -> bool:
    return isinstance(node, ast.Return) and (node.value is None or
                                             (isinstance(node.value, ast.Constant) and node.value.value is None))


def _top_functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Module-level functions and the methods of module-level classes (pytest's ``Test*`` classes)."""
    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(node)
        elif isinstance(node, ast.ClassDef):
            found += [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return found


def early_returns(path: Path) -> list[tuple[int, str]]:
    """``(line, function)`` for each bare return in a checking function of ``path``."""
    functions = _top_functions(ast.parse(path.read_text(), filename=str(path)))
    tests = [f for f in functions if f.name.startswith("test_")]
    called = {n.func.id for t in tests for n in _own_nodes(t) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    offences = []
    for func in functions:
        own = list(_own_nodes(func))
        bare = [n for n in own if _is_bare(n)]
        procedure = not any(isinstance(n, ast.Return) and not _is_bare(n) for n in own)
        if bare and (func.name.startswith(CHECKING) or (func.name in called and procedure)):
            offences += [(n.lineno, func.name) for n in bare]
    return sorted(offences)


def test_no_test_returns_early():
    offences = [f"{path.relative_to(TESTS.parent)}:{line}: return in {name}"
                for path in sorted(TESTS.rglob("*.py")) for line, name in early_returns(path)]
    assert not offences, "a test or checking helper returns early (draw valid inputs or pytest.skip instead):\n" + \
        "\n".join(offences)


PLANTED = '''\
import pytest


def _full_rank(layer):
    if layer is None:
        return None                      # a value: this helper returns one below
    return layer.rank


def _compare(a, b):
    if a is None:
        return                           # caught: a procedure a test calls
    assert a == b


def check_exact(new, old):
    if new is None:
        return None                      # caught: a checking helper
    assert new == old


def test_refused_layers_pass(layer):
    if _full_rank(layer) is None:
        return                           # caught: the test itself
    _compare(layer, layer)

    def hook(module, args):
        return                           # a closure may return

    class Local:
        def forward(self, x):
            return                       # so may a local class's method


class TestGroup:
    def test_method(self):
        for x in range(3):
            if x:
                return                   # caught: a test method, inside a loop
        pytest.skip("a skip with a reason is fine")


def _unused():
    return                               # called by no test: not a check
'''


def test_the_check_catches_a_planted_early_return(tmp_path):
    fake = tmp_path / "test_fake.py"
    fake.write_text(PLANTED)
    caught = [i for i, text in enumerate(PLANTED.splitlines(), 1) if "# caught" in text]
    assert early_returns(fake) == list(zip(caught, ["_compare", "check_exact", "test_refused_layers_pass",
                                                    "test_method"]))

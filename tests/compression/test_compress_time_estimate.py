"""compress shows per-layer progress and warns before a long factorization."""
import ast
import inspect

import torch
from torch import nn

import convfactor
from convfactor.compression import timing
from convfactor.methods import registry
from convfactor.methods.linalg import svd_flops
from convfactor.spec.convspec import ConvSpec


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).double()


X = torch.randn(1, 3, 8, 8, dtype=torch.float64)
RULES = [{"method": "channel_svd", "rank": 2}]


def test_progress_names_each_layer_and_method_on_stderr_only_when_asked(capsys):
    convfactor.compress(_model(), RULES, X, progress=True)
    err = capsys.readouterr().err
    assert "factorizing" in err and "1 (channel_svd)" in err
    convfactor.compress(_model(), RULES, X)                  # stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""


def test_a_long_factorization_is_announced_with_the_slowest_layers(capsys, monkeypatch):
    convfactor.compress(_model(), RULES, X)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(timing, "flop_rate", lambda: 1.0)      # a machine doing one flop per second
    _, report = convfactor.compress(_model(), RULES, X)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convfactor: factorizing 2 layers may take about ")
    assert "the slowest: 1 (channel_svd, ~" in err and report.notes[-1] in err


def test_estimates_grow_with_the_work():
    big = ConvSpec.from_module(nn.Linear(4096, 4096))
    small = ConvSpec.from_module(nn.Linear(256, 256))
    svd = registry.get("linear_svd")
    assert timing.factorization_flops(svd, big, (10,)) == svd_flops(4096, 4096) == 12 * 4096 ** 3
    assert svd_flops(100, 10) == svd_flops(10, 100) == 4 * 100 * 10 ** 2 + 8 * 10 ** 3
    assert timing.factorization_flops(svd, big, (10,)) == 4096 * timing.factorization_flops(svd, small, (10,))
    conv = ConvSpec.from_module(nn.Conv2d(64, 64, 3))
    slow = registry.get("lowrank_sparse")
    assert timing.factorization_flops(slow, conv, (8, 8)) == (slow.admm_iters + slow.refit_iters) * \
        timing.factorization_flops(registry.get("channel_svd"), conv, (8,))
    assert timing.estimate_seconds(svd, big, (10,)) > timing.estimate_seconds(svd, small, (10,)) > 0


def test_timing_asks_the_method_and_never_switches_on_its_name():
    """The estimate is the method's own ``factorization_cost``: ``timing`` reads no ``.name`` (no
    comparison on a method name, no per-method branch) and no option through ``getattr``."""
    tree = ast.parse(inspect.getsource(timing))
    names = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "name"]
    getattrs = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "getattr"]
    method_names = {c.value for c in ast.walk(tree) if isinstance(c, ast.Constant) and c.value in registry.available()}
    assert not names and not getattrs and not method_names, (names, getattrs, method_names)
    tucker = registry.get("tucker2")
    conv = ConvSpec.from_module(nn.Conv2d(32, 32, 3))
    assert timing.factorization_flops(tucker, conv, (8, 8)) == tucker.factorization_cost(conv, (8, 8))

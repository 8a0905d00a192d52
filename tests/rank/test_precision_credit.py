"""The latency planner on a back-end at a lower precision (issue 21, part 4): the dense model at that
precision is the first candidate, timed against the dense fp32 model on the same runtime; an easy
request is met with every layer dense, and otherwise low rank is asked only for the rest."""
from types import SimpleNamespace

import pytest
import torch

from convfactor import models
from convfactor.rank import LatencyConfig, latency_search, plan

from fake_timer import FakeTimer

FAST = dict(methods=("channel_svd",))
INT8 = "openvino:precision=int8"       # a lower precision every CPU runs (bf16 needs AVX512-BF16 or AMX)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return models.get("resnet20"), models.default_input("resnet20")


def _config(backend: str) -> LatencyConfig:
    return LatencyConfig(timer=FakeTimer(), repeats=1, e2e_rounds=1, e2e_repeats=1, backend=backend, cache=None)


def _credit(speedup: float, low: float, calls: list):
    def fake(original, compressed, example, **settings):
        calls.append(settings)
        return SimpleNamespace(speedup=speedup, interval=(low, speedup * 1.05), confident_speedup=low, noise=[])
    return fake


def test_a_precision_that_alone_meets_the_request_keeps_every_layer_dense(resnet, monkeypatch):
    pytest.importorskip("openvino")
    model, x = resnet
    calls = []
    monkeypatch.setattr(latency_search, "compare_speed", _credit(2.5, 2.4, calls))
    p = plan(model, x, target="speedup=2x", latency=_config(INT8), **FAST)
    assert [(c["backend"], c["baseline"]) for c in calls] == [(INT8, "openvino")]
    assert p.compressed == [] and all(layer.note.startswith(f"dense: {INT8} alone measures 2.50x") for layer in p.layers)
    credit = p.summary.precision_credit
    assert credit["meets_request"] and credit["speedup"] == 2.5 and credit["baseline"] == "openvino"
    assert p.summary.requested_speedup == 2 and p.summary.measured_speedup == 2.5 and p.summary.reachable


def test_otherwise_low_rank_is_asked_for_the_rest_of_the_request(resnet, monkeypatch):
    pytest.importorskip("openvino")
    model, x = resnet
    monkeypatch.setattr(latency_search, "compare_speed", _credit(1.5, 1.45, []))
    p = plan(model, x, target="speedup=3x", latency=_config(INT8), **FAST)
    credit = p.summary.precision_credit
    rest = 3 / 1.45                                             # against the credit's lower edge
    assert not credit["meets_request"] and credit["low_rank_request"] == pytest.approx(rest)
    assert p.summary.requested_speedup == 3                      # the user's request, as given
    low, high = p.summary.speedup_band
    assert low <= rest <= high and p.compressed                 # the band is around the rest
    assert p.summary.aimed_speedup == pytest.approx(rest, rel=0.15)     # not aimed at 3x


def test_a_confident_credit_below_the_request_is_not_enough(resnet, monkeypatch):
    """The lower edge of the interval decides: 2.1x measured but 1.9x at the edge does not meet 2x."""
    pytest.importorskip("openvino")
    model, x = resnet
    monkeypatch.setattr(latency_search, "compare_speed", _credit(2.1, 1.9, []))
    p = plan(model, x, target="speedup=2x", latency=_config(INT8), **FAST)
    credit = p.summary.precision_credit
    assert not credit["meets_request"] and credit["low_rank_request"] == pytest.approx(2 / 1.9) and p.compressed


def test_the_credit_is_really_measured_on_the_runtime(resnet):
    """Not patched: the injected clock times the same model on both sides, so the credit is exactly 1x."""
    pytest.importorskip("openvino")
    model, x = resnet
    p = plan(model, x, target="speedup=2x", latency=_config(INT8), **FAST)
    assert p.summary.precision_credit["speedup"] == pytest.approx(1.0)
    assert p.summary.precision_credit["low_rank_request"] == pytest.approx(2.0)


def test_a_backend_at_its_default_precision_gets_no_credit(resnet, monkeypatch):
    model, x = resnet
    monkeypatch.setattr(latency_search, "compare_speed", lambda *a, **k: pytest.fail("no credit to measure"))
    p = plan(model, x, target="speedup=2x", latency=_config("torch"), **FAST)
    assert p.summary.precision_credit is None and p.summary.requested_speedup == 2

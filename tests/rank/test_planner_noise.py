"""The latency planner on a busy machine: it accepts a try on the confident figure (the interval's
lower edge), never chases a noisy check to far more MACs reduction than needed, keeps its layer
table on disk across runs, reports each check as it goes, and plans on ONNX Runtime too."""
import random
from dataclasses import replace

import pytest
import torch
from torch import nn

from convfactor import models
from convfactor.rank import LatencyConfig, plan
from convfactor.rank.latency import default_cache_path
from convfactor.rank.latency_search import Trial
from convfactor.rank.target import SpeedupBand

from fake_timer import FakeTimer

FAST = dict(methods=("channel_svd",))


def _trial(measured, lo, hi):
    return Trial(iteration=0, memory_format="contiguous", aimed_speedup=3.36, predicted_speedup=3.4,
                 measured_speedup=measured, rms_kernel_error=0.1, feasible=True, reference_ms=1.0,
                 plan_ms=1 / measured, predicted_ms=1.0, interval=(lo, hi))


def test_a_try_is_accepted_on_its_confident_figure():
    band = SpeedupBand.at_least(3.0, 0.12)                      # 3.18-3.54x, request 3
    assert _trial(3.3, 3.1, 3.5).lands_in(band)
    assert not _trial(3.3, 2.7, 3.9).lands_in(band)             # a noisy check: the median alone is not enough
    around = SpeedupBand.around(2.0, 0.1)
    assert _trial(1.9, 1.85, 1.95).lands_in(around) and not _trial(1.9, 1.7, 2.0).lands_in(around)


class BusyE2E(FakeTimer):
    """Layers timed as FakeTimer; whole compressed models scaled by ``1 + uniform(low, high)`` per call:
    a busy machine that hits the end-to-end checks (slow and/or jittery)."""

    def __init__(self, low: float, high: float, seed: int = 0):
        super().__init__()
        self.low, self.high, self.rng = low, high, random.Random(seed)

    def __call__(self, module, inputs):
        t = super().__call__(module, inputs)
        factorized = sum(type(m).__name__ == "Factorized" for m in module.modules())
        return t * (1 + self.rng.uniform(self.low, self.high)) if factorized > 1 else t


def test_a_noisy_check_ends_the_search_instead_of_cutting_deeper():
    torch.manual_seed(0)
    model, x = models.get("resnet20"), models.default_input("resnet20")
    cfg = LatencyConfig(timer=BusyE2E(-0.6, 0.6, seed=1), repeats=1, e2e_rounds=3, e2e_repeats=2, e2e_max_rounds=4,
                        max_iter=5,
                        margin=0.12)
    p = plan(model, x, target="speedup=1.5x", latency=cfg, progress=False, **FAST)
    history = p.summary.history
    assert history[0]["noise"] and len(history) == 1              # no re-aim on noisy evidence
    assert "could not be confirmed" in p.summary.message or p.summary.reachable


def test_noise_cannot_push_the_plan_past_the_aim_cap():
    torch.manual_seed(0)
    model, x = models.get("resnet20"), models.default_input("resnet20")
    cfg = LatencyConfig(timer=BusyE2E(1.0, 2.0), repeats=1, e2e_rounds=1, e2e_repeats=1, max_iter=5,
                        margin=0.12,
                        max_aim_factor=1.5)
    p = plan(model, x, target="speedup=1.5x", latency=cfg, progress=False, **FAST)
    aims = [h["aimed_speedup"] for h in p.summary.history]
    assert len(aims) > 1 and max(aims) <= 1.5 * aims[0] + 1e-9
    assert not p.summary.reachable and p.summary.message           # said, not hidden


def test_layer_timings_persist_on_disk_across_runs(tmp_path, monkeypatch):
    tmp_path = tmp_path / "not" / "yet"                   # a fresh machine: the cache folder does not exist
    monkeypatch.setenv("CONVFACTOR_CACHE_DIR", str(tmp_path))
    import convfactor.measure.compare as compare          # real clocks under a parallel test run are noisy, and a
    monkeypatch.setattr(compare, "_noise", lambda *a: [])   # noisy plan keeps nothing (tested below)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(1, 8, 16, 16)
    cfg = LatencyConfig(repeats=2, e2e_rounds=2, e2e_repeats=1, e2e_max_rounds=2, max_iter=1,
                        formats=("contiguous",), ratios=(0.3,))
    plan(model, x, target="speedup=1.2x", latency=cfg, progress=False, **FAST)
    path = default_cache_path()
    assert path.parent == tmp_path and path.is_file()
    import json
    entries = json.loads(path.read_text())["timings"]
    plan(model, x, target="speedup=1.2x", latency=cfg, progress=False, **FAST)
    assert json.loads(path.read_text())["timings"] == entries    # warm: nothing new was timed per layer


def test_a_busy_plan_keeps_no_timings_on_disk(tmp_path):
    """Layer timings taken while the end-to-end checks were noisy would mislead every later plan on this
    machine (seen: a demo under a burner, then a quiet demo reusing its table), so none are saved."""
    torch.manual_seed(0)
    model, x = models.get("resnet20"), models.default_input("resnet20")
    path = tmp_path / "latency.json"
    busy = LatencyConfig(timer=BusyE2E(-0.6, 0.6, seed=1), repeats=1, e2e_rounds=3, e2e_repeats=2, e2e_max_rounds=4,
                         cache=str(path))
    p = plan(model, x, target="speedup=1.5x", latency=busy, progress=False, **FAST)
    assert p.summary.history[0]["noise"] and p.summary.timings_cached is False and not path.exists()
    quiet = plan(model, x, target="speedup=1.5x", latency=replace(busy, timer=BusyE2E(0.0, 0.0)), progress=False,
                 **FAST)
    assert quiet.summary.timings_cached is True and path.is_file()


def test_each_end_to_end_check_is_reported(capsys):
    torch.manual_seed(0)
    model, x = models.get("resnet20"), models.default_input("resnet20")
    cfg = LatencyConfig(timer=FakeTimer(), repeats=1, e2e_rounds=1, e2e_repeats=1)
    p = plan(model, x, target="speedup=1.5x", criterion="latency", latency=cfg, **FAST)   # progress by default
    err = capsys.readouterr().err
    assert err.count("check ") == len(p.summary.history) and "measured" in err


def test_plans_on_onnxruntime():
    pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    x = torch.randn(1, 16, 24, 24)
    cfg = LatencyConfig(backend="onnxruntime", threads=1, repeats=2, e2e_rounds=2, e2e_repeats=1,
                        e2e_max_rounds=2, max_iter=1, ratios=(0.25,), cache=None)
    p = plan(model, x, target="speedup=1.3x", latency=cfg, progress=False, **FAST)
    assert p.environment["backend"] == "onnxruntime" and p.memory_format == "contiguous"
    assert p.summary.history and p.summary.history[0]["interval"] is not None

"""Timing back-ends and the noise-aware end-to-end verifier (injected clocks, plus one real ORT run)."""
import itertools
import random

import pytest
import torch
from torch import nn

from convfactor.measure.backends import EagerBackend, OnnxRuntimeBackend, Runnable, get_backend
from convfactor.measure.compare import TimingConfig, compare_speed


def _models():
    torch.manual_seed(0)
    big = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    small = nn.Sequential(nn.Conv2d(4, 2, 3, padding=1), nn.Conv2d(2, 4, 1))
    return big, small


def _clock(big_ms, small_ms, jitter=0.0, seed=0, drift=None):
    """A fake ``timer(module, inputs) -> seconds``: big/small models by their weight count."""
    rng, calls = random.Random(seed), itertools.count()

    def timer(module, inputs):
        n = next(calls)
        base = big_ms if sum(p.numel() for p in module.parameters()) > 400 else small_ms
        scale = drift(n) if drift and base == big_ms else 1.0
        return base * scale * (1 + rng.uniform(-jitter, jitter)) / 1e3
    return timer


def test_quiet_clock_gives_a_tight_interval_in_the_minimum_rounds():
    big, small = _models()
    res = compare_speed(big, small, torch.randn(1, 4, 8, 8), timer=_clock(2.0, 1.0, jitter=0.01),
                        repeats=9, rounds=3, max_rounds=20, memory_formats=("contiguous",))
    assert res.rounds == 3 and not res.noisy
    lo, hi = res.interval
    assert lo <= res.speedup <= hi and 1.9 < lo and hi < 2.1
    assert res.confident_speedup == lo and res.to_dict()["interval"] == (lo, hi)


def test_busy_clock_measures_more_rounds_and_the_interval_holds_the_truth():
    big, small = _models()
    res = compare_speed(big, small, torch.randn(1, 4, 8, 8), timer=_clock(3.0, 1.0, jitter=0.6, seed=3),
                        repeats=6, rounds=3, max_rounds=40, rel_halfwidth=0.05, memory_formats=("contiguous",))
    assert res.rounds > 3
    lo, hi = res.interval
    assert lo < 3.0 < hi
    if res.rounds == 40:                       # gave up: it must say so
        assert any("interval" in why for why in res.noise)
    else:
        assert (hi - lo) / 2 <= 0.05 * res.speedup


def test_drift_of_the_original_is_reported_not_averaged_away():
    big, small = _models()
    drift = lambda n: 1.0 if n < 6 else 2.5     # noqa: E731 - the machine got busy after two rounds
    res = compare_speed(big, small, torch.randn(1, 4, 8, 8), timer=_clock(2.0, 1.0, drift=drift),
                        repeats=6, rounds=4, memory_formats=("contiguous",))
    assert res.noisy and any("drifted" in why for why in res.noise)
    assert "noisy" in res.summary()


def test_give_up_after_max_rounds_and_say_so():
    big, small = _models()
    res = compare_speed(big, small, torch.randn(1, 4, 8, 8), timer=_clock(2.0, 1.0, jitter=0.9, seed=1),
                        repeats=3, rounds=3, max_rounds=5, rel_halfwidth=0.001, memory_formats=("contiguous",))
    assert res.rounds == 5 and any("wider than" in why for why in res.noise)


def test_bad_settings_fail_before_timing():
    with pytest.raises(ValueError, match="unknown timing back-end"):
        get_backend("tensorrt")
    with pytest.raises(ValueError):
        TimingConfig(rounds=0)
    with pytest.raises(ValueError):
        TimingConfig(rounds=5, max_rounds=3)


def test_eager_forms_leave_the_model_as_it_was():
    big, _ = _models()
    before = {k: v.clone() for k, v in big.state_dict().items()}
    forms = EagerBackend().prepare(big, (torch.randn(1, 4, 8, 8),))
    assert set(forms) == {"contiguous", "channels_last"} and all(isinstance(f, Runnable) for f in forms.values())
    assert forms["channels_last"].inputs[0].is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(before[k], v) for k, v in big.state_dict().items())
    assert next(big.parameters()).is_contiguous()


def test_onnxruntime_backend_times_the_exported_model():
    pytest.importorskip("onnxruntime")
    big, small = _models()
    x = torch.randn(1, 4, 16, 16)
    form = OnnxRuntimeBackend(threads=1).prepare(big, (x,))["onnxruntime"]
    got = torch.from_numpy(form.call()[0])
    torch.testing.assert_close(got, big(x), rtol=1e-4, atol=1e-5)      # it runs the same function
    assert form.setup_s > 0 and form.info["intra_op_threads"] == 1
    res = compare_speed(big, small, x, backend="onnxruntime", threads=1, repeats=3, rounds=3)
    assert res.original_best == res.compressed_best == "onnxruntime"
    assert res.env["backend"] == "onnxruntime" and res.speedup > 0 and res.setup_s


def test_compile_keeps_compiling_many_models_of_one_class():
    """dynamo gives up on a forward after 8 variants and runs eager silently: a planner's checks compile
    more than that, so each prepared form must really be compiled (counted by the compiler backend)."""
    from convfactor.measure.backends import CompileBackend
    compiled = []

    def counting(gm, example_inputs):
        compiled.append(gm)
        return gm.forward
    backend = CompileBackend(memory_formats=("contiguous",), options={"backend": counting})
    x = (torch.randn(1, 3, 8, 8),)
    for width in range(1, 13):                 # 12 distinct nn.Sequential models: one code object
        model = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.ReLU())
        form = backend.prepare(model, x)["compiled/contiguous"]
        assert not isinstance(form, str), form
        assert torch.allclose(form.call(), model(*x))
    assert len(compiled) >= 12


def test_a_baseline_times_the_original_on_another_precision(monkeypatch):
    """bf16 reported against dense fp32 on the same runtime: the original runs only fp32 forms, the
    compressed only bf16 ones, interleaved; efficiency is withheld (MACs did not buy that speed)."""
    from convfactor import utils
    monkeypatch.setattr(utils, "cpu_has", lambda *flags: True)
    big, small = _models()
    res = compare_speed(big, small, torch.randn(1, 4, 8, 8), timer=_clock(3.0, 1.0), repeats=6, rounds=3,
                        backend="torch:precision=bf16", baseline="torch", memory_formats=("contiguous",))
    assert res.original_best == "contiguous" and res.compressed_best == "contiguous@bf16"
    assert set(res.original) == {"contiguous"} and set(res.compressed) == {"contiguous@bf16"}
    assert abs(res.speedup - 3.0) < 1e-9 and res.efficiency is None
    assert res.env["baseline"] == "torch" and res.env["backend"] == "torch:precision=bf16"
    same = compare_speed(big, small, torch.randn(1, 4, 8, 8), timer=_clock(3.0, 1.0), repeats=6, rounds=3,
                         backend="torch", baseline="torch", memory_formats=("contiguous",))
    assert "baseline" not in same.env and same.efficiency is not None

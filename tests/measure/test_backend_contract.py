"""The timing back-end contract, run on every registered back-end at every precision it lists (as
tests/methods/test_contract.py does for methods): a new runtime is one module plus a registry line,
and this file covers it with no edit."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from convfactor import utils
from convfactor.measure import backends as B
from convfactor.measure.backends import BACKENDS, Runnable, backend_class, get_backend, prepare_one

CONFIGS = [(name, p) for name in BACKENDS for p in backend_class(name).precisions]
#: how far a precision may move the output (relative L2) from float32 PyTorch's
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "int8": 1.5e-1}


def _model_and_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 3, 3, padding=1)).eval()
    return model, torch.rand(1, 3, 24, 24)


def _backend(name: str, precision: str):
    spec = name if precision == backend_class(name).precisions[0] else f"{name}:precision={precision}"
    try:
        return get_backend(spec, threads=1)
    except ValueError as exc:
        if "needs a CPU with" in str(exc):
            pytest.skip(f"{spec}: {exc}")        # the refusal itself is tested below
        raise


@pytest.mark.parametrize("name,precision", CONFIGS)
def test_forms_time_and_agree_with_pytorch(name, precision):
    backend = _backend(name, precision)
    model, x = _model_and_input()
    forms = backend.prepare(model, (x,))
    ready = {k: f for k, f in forms.items() if isinstance(f, Runnable)}
    assert ready, f"{backend.key} prepared no form: {forms}"
    assert set(forms) == {backend.form_for(f) for f in backend.layouts(B.FORMS)}
    with torch.no_grad():
        ref = model(x)
    for key, form in ready.items():
        samples = backend.time(form, repeats=3, warmup=1, threads=1)
        assert len(samples) == 3 and all(s > 0 for s in samples)
        got = backend.output(form)
        assert got.shape == ref.shape
        assert float((got - ref).norm() / ref.norm()) < TOLERANCE[precision], key


@pytest.mark.parametrize("name,precision", CONFIGS)
def test_the_deployed_face_serves_other_image_sizes_at_its_precision(name, precision):
    backend = _backend(name, precision)
    model, x = _model_and_input()
    face = backend.deployed(model, x)
    for size in [(24, 24), (17, 30)]:
        y = torch.rand(1, 3, *size)
        with torch.no_grad():
            ref, got = model(y), face(y)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert float((got - ref).norm() / ref.norm()) < TOLERANCE[precision], (name, precision, size)


@pytest.mark.parametrize("name,precision", CONFIGS)
def test_name_key_description_and_channel_block(name, precision):
    backend = _backend(name, precision)
    assert backend.key == (name if precision == backend.precisions[0] else f"{name}:precision={precision}")
    assert get_backend(backend.key).key == backend.key                       # the key resolves to itself
    described = backend.describe()
    assert described["backend"] == backend.key and described["precision"] == precision
    assert described["runtime"].split()[0] in ("torch", name)
    block = backend.channel_multiple()
    assert block is None or (isinstance(block, int) and block in (8, 16))
    model, x = _model_and_input()
    assert isinstance(prepare_one(backend, model, (x,)), Runnable)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_an_unknown_precision_or_option_is_one_line(name):
    with pytest.raises(ValueError, match=r"runs precision .*not 'fp8'") as err:
        get_backend(f"{name}:precision=fp8")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown option"):
        get_backend(f"{name}:colour=blue")


@pytest.mark.parametrize("name", [n for n in BACKENDS if "bf16" in backend_class(n).precisions])
def test_bf16_is_refused_on_a_cpu_without_it(name, monkeypatch):
    monkeypatch.setattr(utils, "cpu_has", lambda *flags: False)
    with pytest.raises(ValueError, match="needs a CPU with AVX512-BF16 or AMX"):
        get_backend(f"{name}:precision=bf16")


def test_a_timer_backend_keeps_its_inner_forms_and_key():
    model, x = _model_and_input()
    for name in BACKENDS:
        inner = get_backend(name)
        fake = get_backend(inner, timer=lambda module, inputs: 1e-3)
        assert fake.key == inner.key
        assert set(fake.prepare(model, (x,))) == {inner.form_for(f) for f in inner.layouts(B.FORMS)}


FAST = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
PROBE = ("import torch; from torch import nn; from convfactor.measure.backends import get_backend\n"
         "b = get_backend('openvino', threads=1); m = nn.Conv2d(3, 8, 3).eval(); x = torch.rand(1, 3, 16, 16)\n"
         "f = b.prepare(m, (x,))['openvino']; print(tuple(b.output(f).shape))")


@pytest.mark.skipif(not os.path.exists(FAST), reason="tcmalloc is not installed here")
def test_openvino_runs_under_a_preloaded_allocator(tmp_path):
    """OpenVINO aborted (free(): invalid pointer) with tcmalloc in LD_PRELOAD; now it runs, and a user
    who turned the oneTBB switch off gets one line instead of an abort."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TBB_ENABLE_SANITIZERS"}
    env["LD_PRELOAD"] = FAST
    run = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "(1, 8, 14, 14)" in run.stdout, run.stderr[-500:]
    env["TBB_ENABLE_SANITIZERS"] = "0"
    run = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "OpenVINO aborts under a preloaded" in run.stderr.splitlines()[-1]


def test_the_reexec_environment_carries_the_onetbb_switch():
    from convfactor import openvino_runtime
    from convfactor.measure import allocator
    assert allocator.TBB_SAFE_ENV == openvino_runtime.TBB_SAFE_ENV

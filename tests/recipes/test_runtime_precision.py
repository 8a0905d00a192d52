"""A lower-precision report back-end (OpenVINO int8, or bf16 where the CPU runs it) is reported twice,
against the dense model at its own precision and against the dense fp32 model on the same runtime, and
its quality is measured through the runtime itself."""
from __future__ import annotations

import pytest
import torch

from convfactor.data.images import builtin_images
from convfactor.measure.backends import BF16_FLAGS, get_backend
from convfactor.measure.quality import evaluate_sr
from convfactor.recipes.pipeline import PipelineConfig, compress_finetune_measure, fp32_of, summary_rows
from convfactor.utils import cpu_has, torch_threads

PRECISIONS = ["openvino:precision=int8"] + (["openvino:precision=bf16"] if cpu_has(*BF16_FLAGS) else [])


def test_fp32_of_names_the_default_precision():
    assert fp32_of("openvino:precision=bf16") == "openvino" and fp32_of("onnxruntime:precision=int8") == "onnxruntime"
    assert fp32_of("openvino") is None and fp32_of("torch:precision=fp32") is None


@pytest.mark.parametrize("backend", PRECISIONS)
def test_a_lower_precision_is_timed_twice_and_scored_through_its_runtime(backend):
    cfg = PipelineConfig(input_size=24, steps=1, batch_size=2, patch_size=16, eval_side=48, eval_limit=2,
                         planner="fixed", threads=1, speed_repeats=3, train_side=64, progress=False,
                         report_backends=("torch", backend))
    res = compress_finetune_measure(cfg, log=lambda *a: None)
    same, against_fp32 = res.speeds[backend], res.speeds[f"{backend} vs openvino"]
    assert same.env["backend"] == backend and "baseline" not in same.env
    assert against_fp32.env["backend"] == backend and against_fp32.env["baseline"] == "openvino"
    assert set(against_fp32.original) == {"openvino"} and set(against_fp32.compressed) == {backend}
    assert against_fp32.efficiency is None and same.efficiency is not None
    # quality through the runtime: the same figure as scoring the runtime's own face of the model
    images = builtin_images("test", max_side=48, limit=2)
    runtime = get_backend(backend, threads=1, calibration=tuple())
    stage = f"compressed@{backend}"
    if backend.endswith("bf16"):          # deterministic: re-score the runtime's face independently
        with torch_threads(1):
            again = evaluate_sr(runtime.deployed(res.compressed, res.example), images, 2)
        assert res.quality[stage]["psnr"] == pytest.approx(again["psnr"], abs=1e-6)
    torch_psnr = res.quality["compressed"]["psnr"]
    assert res.quality[stage]["psnr"] != torch_psnr                     # really not PyTorch's number
    if backend.endswith("bf16"):
        assert abs(res.quality[stage]["psnr"] - torch_psnr) < 0.5      # bf16 moves it only a little
    assert 5 < res.quality[stage]["psnr"] < 60
    labels = [r["label"] for r in summary_rows(res)]
    assert f"original on {backend}" in labels and f"compressed + fine-tuned on {backend}" in labels


@pytest.mark.skipif(not cpu_has(*BF16_FLAGS), reason="this CPU does not run bf16 natively")
def test_dense_at_a_lower_precision_is_the_first_candidate():
    """bf16 alone meets an easy request: nothing is factorized (0 dB from low rank), and the verdict is
    judged against the dense fp32 model on the same runtime."""
    cfg = PipelineConfig(input_size=32, steps=5, batch_size=2, patch_size=16, eval_side=48, eval_limit=1, planner="latency", speedup=1.2,
                         threads=1, speed_repeats=3, train_side=64, progress=False, backend="openvino:precision=bf16",
                         report_backends=("torch",))
    lines = []
    res = compress_finetune_measure(cfg, log=lines.append)
    assert res.plan_kind.startswith("dense at openvino:precision=bf16") and res.params.compressed == res.params.original
    assert any(line.startswith("  dense at openvino:precision=bf16 vs openvino:") for line in lines)
    assert res.speed.env["baseline"] == "openvino" and res.speed is res.speeds["openvino:precision=bf16 vs openvino"]
    assert res.speed.confident_speedup >= 1.2
    assert res.finetune_history == [] and any("no fine-tuning: nothing was factorized" in line for line in lines)
    assert all(torch.equal(a, b) for a, b in zip(res.compressed.state_dict().values(),
                                                  res.original.state_dict().values()))     # the dense weights

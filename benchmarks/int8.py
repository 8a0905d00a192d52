"""Low rank stacked with int8 on ONNX Runtime (issue 15, part 4).

EDSR-baseline x2 is latency-planned for 3x on ONNX Runtime at 256x256 LR (batch 1, 2 threads) and
fine-tuned as in the ``models`` section; the original and the compressed model are exported (dynamic
image size) and each quantized to static int8 by :func:`convfactor.quantize.quantize_int8`
(calibrated on LR crops of the built-in *training* photos; the image-facing convs kept in float32).
The four files are timed interleaved in one process against the dense float32 file, and scored by
PSNR-Y on the held-out photos through ONNX Runtime itself.
"""
from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from convfactor.data.images import builtin_images
from convfactor.data.sr import calibration_crops
from convfactor.export import OnnxModule, export_model
from convfactor.measure.backends import sample_ms
from convfactor.measure.compare import ratio_interval
from convfactor.measure.latency import environment
from convfactor.measure.quality import evaluate_sr
from convfactor.quantize import quantize_int8
from convfactor.recipes.pipeline import compress_finetune_measure

from .markdown import heading, table
from .pipeline_settings import bench_config
from .section import Section

TITLE = "Low rank + int8 on ONNX Runtime"
FULL = dict(side=256, steps=900, batch=16, patch=32, calib_side=96, calib_images=8, rounds=5, per_round=3,
            eval_side=None, eval_limit=None)
QUICK = dict(side=24, steps=2, batch=2, patch=16, calib_side=24, calib_images=2, rounds=2, per_round=1,
             eval_side=48, eval_limit=1)
VARIANTS = ("dense fp32", "dense int8", "low-rank fp32", "low-rank int8")


@dataclass
class Results:
    quick: bool
    rows: list[dict]                 # per variant: ms, speed-up vs dense fp32 with interval, PSNR-Y, size
    kept_fp32: list[str]
    plan_message: str | None
    macs_reduction: float
    env: dict


def onnx_files(models: dict[str, torch.nn.Module], example: torch.Tensor, tmp: Path, spec: dict
               ) -> tuple[dict[str, Path], list[str]]:
    """Per ``label -> model``: ``"LABEL fp32"`` (exported with a dynamic image size) and ``"LABEL int8"``
    (static int8, calibrated on LR crops of the training photos); and the node names kept in float32."""
    crops = calibration_crops(builtin_images("train", limit=spec["calib_images"]), 2, spec["calib_side"])
    files, kept = {}, []
    for label, model in models.items():
        fp32 = export_model(model.eval(), example, tmp / f"{label}.onnx", opset=17, dynamic_spatial=True,
                            log=lambda m: None)
        report = quantize_int8(fp32, tmp / f"{label}-int8.onnx", crops)
        files[f"{label} fp32"], files[f"{label} int8"], kept = fp32, Path(report.path), report.kept_fp32
    return files, kept


def interleaved_ms(sessions: dict[str, OnnxModule], x: torch.Tensor, rounds: int, per_round: int
                   ) -> dict[str, list[list[float]]]:
    """Per session, per round: ms samples (2 threads); the order rotates every round."""
    names = list(sessions)
    out = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            out[n].append(sample_ms(lambda: sessions[n](x), (x,), repeats=per_round, warmup=2 if r == 0 else 1,
                                    threads=2))
    return out


def speed_row(times: dict[str, list[list[float]]], name: str, reference: str) -> dict:
    """``name``'s median ms and its speed-up over ``reference`` (ratio of medians, 95% interval)."""
    med = {n: statistics.median([t for r in times[n] for t in r]) for n in (name, reference)}
    return dict(ms=med[name], speedup=med[reference] / med[name], interval=ratio_interval(times[reference], times[name]))


def measure(quick: bool = False) -> Results:
    spec = QUICK if quick else FULL
    cfg = bench_config(quick, input_size=spec["side"], steps=spec["steps"], batch_size=spec["batch"],
                       patch_size=spec["patch"], backend="onnxruntime", report_backends=("onnxruntime",),
                       plan_margin=0.06)
    res = compress_finetune_measure(cfg, log=lambda *a: None)
    images = builtin_images("test", max_side=spec["eval_side"], limit=spec["eval_limit"])
    with tempfile.TemporaryDirectory() as tmp:
        files, kept = onnx_files({"dense": res.original, "low-rank": res.compressed}, res.example, Path(tmp), spec)
        sessions = {n: OnnxModule(files[n], threads=2) for n in VARIANTS}
        times = interleaved_ms(sessions, res.example, spec["rounds"], spec["per_round"])
        rows = [dict(variant=n, **speed_row(times, n, "dense fp32"),
                     psnr=evaluate_sr(sessions[n], images, 2, baseline=False)["psnr"],
                     mbytes=files[n].stat().st_size / 2 ** 20) for n in VARIANTS]
    return Results(quick, rows, kept, res.plan_message, res.macs.original / res.macs.compressed, environment(2))


def render(r: Results) -> str:
    lines = heading(TITLE)
    lines += [f"EDSR-baseline x2, LR {QUICK['side'] if r.quick else FULL['side']}², batch 1, {r.env.get('threads')} "
              f"threads, {r.env.get('cpu')}, onnxruntime CPU provider (all graph optimizations), models exported with "
              f"a dynamic image size, malloc={r.env.get('malloc')}. The low-rank model: latency-planned for 3x on "
              f"ONNX Runtime and fine-tuned (MACs / {r.macs_reduction:.2f}). Speed-ups against the dense fp32 file, "
              "interleaved rounds, 95% interval; PSNR-Y on the held-out photos, through ONNX Runtime.", ""]
    base = r.rows[0]["psnr"]
    lines += table(["variant", "ms", "speed-up (95%)", "PSNR-Y dB", "loss dB", "file MiB"],
                   [[x["variant"], f"{x['ms']:.1f}", f"**{x['speedup']:.2f}x** ({x['interval'][0]:.2f}-"
                     f"{x['interval'][1]:.2f})", f"{x['psnr']:.3f}", f"{base - x['psnr']:.3f}", f"{x['mbytes']:.2f}"]
                    for x in r.rows])
    best = r.rows[-1]
    lines += ["", f"- Kept in float32 (image-facing convs): {', '.join(r.kept_fp32) or 'none'}.",
              f"- Target: low rank + int8 >= 6x against dense fp32 on ONNX Runtime: "
              f"{'met' if best['interval'][0] >= 6 else '**MISSED**'} ({best['speedup']:.2f}x, "
              f"{base - best['psnr']:.3f} dB lost)."]
    if r.plan_message:
        lines.append(f"- Planner: {r.plan_message}.")
    if r.quick:
        lines.append("- Quick mode: tiny input, MACs-budget plan, 2 fine-tuning steps; the numbers mean nothing.")
    return "\n".join(lines) + "\n"


SECTION = Section("int8", TITLE, measure, render)

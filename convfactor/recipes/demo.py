"""The demo recipe: the shipped model compressed for a measured speed-up, fine-tuned with distillation,
measured before and after on the held-out built-in photos
(:func:`~convfactor.recipes.pipeline.compress_finetune_measure`), then reported: ``report.json``,
``report.md``, ``report.html``, ``demo.json`` and the shipped model in ``OUT/model``.

:func:`run_demo` is what ``convfactor demo`` calls.  The report's data is assembled here
(:func:`build_report_data`); its measured part comes from :func:`convfactor.measure.report_data.collect`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data.denoise import denoise_eval_images, eval_noisy
from ..data.images import builtin_images
from ..data.sr import bicubic_upscale, sr_eval_pairs
from ..files import check_writable
from ..io import save
from ..measure import quality
from ..measure.report_data import backend_rows, collect, latency_rows
from ..report import image_panel, write_report
from ..report.published import SR_REFERENCES
from ..utils import eval_mode
from .pipeline import PipelineConfig, PipelineResult, compress_finetune_measure, summary_rows

__all__ = ["DemoRun", "run_demo", "EXIT_CODES", "format_summary", "image_crops", "report_headline", "frontier_data",
           "build_report_data", "answer_lines", "MAX_LOSS_DB"]


#: the demo's default quality bar: PSNR(-Y) lost on the held-out photos, dB (what "0.1 dB lost" users ask)
MAX_LOSS_DB = 0.15


@dataclass
class DemoRun:
    """What :func:`run_demo` measured and wrote."""
    result: PipelineResult
    rows: list[dict]                      # :func:`~convfactor.recipes.pipeline.summary_rows`
    paths: dict[str, Path]                # :func:`convfactor.report.write_report`'s, plus ``"demo"``: demo.json
    model_dir: Path                       # the shipped model (convfactor format)
    quick: bool = False
    answer: tuple[str, ...] = ()          # :func:`answer_lines`: what the report opens with

    @property
    def exit_code(self) -> int:
        """:data:`EXIT_CODES` of the verdict; 0 for a ``quick`` smoke run (its numbers mean nothing)."""
        return 0 if self.quick else EXIT_CODES[self.result.verdict.kind]

    def summary(self) -> str:
        """The summary table the demo prints (:func:`format_summary`), then the quality bar's line."""
        return format_summary(self.result, self.rows) + "".join(f"\n{line}" for line in self.answer[1:2])


def run_demo(cfg: PipelineConfig, out_dir, *, quick: bool = False, log: Callable = print,
             max_loss_db: float = MAX_LOSS_DB) -> DemoRun:
    """Compress, fine-tune and measure ``cfg`` (:func:`compress_finetune_measure`), then write the report,
    ``demo.json`` and the shipped model into ``out_dir`` (checked writable before any work)."""
    out_dir = Path(out_dir)
    check_writable(out_dir / "report.json" if out_dir.is_dir() else out_dir)
    result = compress_finetune_measure(cfg, log=log)
    rows = summary_rows(result)
    data = build_report_data(result, rows, quick=quick, max_loss_db=max_loss_db)
    paths = write_report(out_dir, data)
    paths["demo"] = out_dir / "demo.json"
    paths["demo"].write_text(json.dumps(data["demo"], indent=2, default=str))
    model_dir = save(result.shipped_model, out_dir / "model", metadata={"model": result.config.model,
                                                                        "input_shape": list(result.example.shape)})
    return DemoRun(result, rows, paths, model_dir, quick, tuple(data["answer"]))


#: the demo's exit status by verdict: 0 only when the requested speed-up is confirmed by its interval;
#: 1 when the compressed model is slower with confidence (the original is shipped); 3 when the target is
#: missed or cannot be confirmed on a busy machine (the compressed model is shipped, and the line says so)
EXIT_CODES = {"met": 0, "slower": 1, "missed": 3, "unconfirmed": 3}


def format_summary(result: PipelineResult, rows: list[dict]) -> str:
    """The summary table the demo prints: one line per operating point, then the speed-up and the loss."""
    s = result.speed
    q = "PSNR-Y" if result.task == "sr" else "PSNR"
    w = max(32, *(len(r["label"]) for r in rows))
    lines = [f"{'':<{w}} {'params':>10} {'GMACs':>8} {'ms':>9} {q + ' dB':>10} {'SSIM':>7}"]
    for r in rows:
        lines.append(f"{r['label']:<{w}} {r['params']:>10} {(r['macs'] or 0) / 1e9:>8.2f} "
                     f"{(r['latency_ms'] or float('nan')):>9.1f} {r['psnr']:>10.3f} {r['ssim']:>7.4f}")
    loss = rows[0]["psnr"] - rows[2]["psnr"]
    lines.append(f"measured speed-up {s.speedup:.2f}x (original fastest as {s.original_best}, compressed as "
                 f"{s.compressed_best}); MACs / {result.macs.original / result.macs.compressed:.2f}; "
                 f"{q} loss {loss:.3f} dB after {result.timings_s.finetune / 60:.1f} min of fine-tuning")
    lines.append(f"plan: {result.plan_kind}")
    if result.plan_message:
        lines.append(f"planner: {result.plan_message}")
    lines.append(result.verdict.line + ("; shipping the ORIGINAL model" if result.shipped == "original" else ""))
    return "\n".join(lines)


def _model_input(result: PipelineResult, name: str, img) -> tuple[torch.Tensor, torch.Tensor, str, torch.Tensor]:
    """(model input, ground truth, baseline label, baseline output) of one held-out photo."""
    if result.task == "sr":
        _, lr, hr = sr_eval_pairs([(name, img)], result.scale)[0]
        return lr, hr, "bicubic", bicubic_upscale(lr, result.scale)
    _, clean = denoise_eval_images([(name, img)], grey=result.example.shape[1] == 1)[0]
    noisy = eval_noisy(name, clean, result.config.sigma)
    return noisy, clean, "noisy input", noisy


def image_crops(result: PipelineResult, side: int = 64) -> list[dict]:
    """Centre crops of the first held-out photo: ground truth, baseline, original, compressed, each output
    with its PSNR/SSIM over the whole photo (quality's conventions: Y and shave = scale for SR)."""
    name, img = builtin_images("test", max_side=max(2 * side, result.config.eval_side or 0), limit=1)[0]
    x, target, base_label, base = _model_input(result, name, img)
    with torch.no_grad(), eval_mode(result.original, result.compressed):
        outputs = {base_label: base, "original": result.original(x[None]),
                   "compressed + fine-tuned": result.compressed(x[None])}
    h, w = target.shape[-2:]
    crop = (max(0, (h - side) // 2), max(0, (w - side) // 2), side, side)
    options = {"scale": result.scale} if result.task == "sr" else {"scale": 0, "y_channel": False}
    rows = image_panel(target, outputs, crop, metrics=lambda out, gt: {"psnr": quality.psnr(out, gt, **options),
                                                                       "ssim": quality.ssim(out, gt, **options)})
    return [dict(r, label=f"{name}: {r['label']}") for r in rows]


def report_headline(result: PipelineResult) -> str:
    """The report title's claim, as loud about a miss as about a success."""
    s, request = result.speed, result.config.speedup
    return {"met": f"{s.speedup:.2f}x measured, {request:g}x target met",
            "missed": f"target missed: {s.speedup:.2f}x measured against {request:g}x",
            "unconfirmed": f"target not confirmed: {s.speedup:.2f}x measured against {request:g}x on a noisy machine",
            "slower": f"slower than the original ({s.speedup:.2f}x); the original is shipped"}[result.verdict.kind]


def frontier_data(result: PipelineResult, rows: list[dict]) -> dict:
    """The report's speed-up vs loss figure: per timed back-end, the original (1x, 0 dB) and the
    fine-tuned model at its measured speed-up; for SR, the published reference marks."""
    loss = rows[0]["psnr"] - rows[2]["psnr"]
    points = []
    for backend, s in result.speeds.items():
        interval = list(s.interval) if s.interval else None
        points += [{"group": backend, "speedup": 1.0, "loss": 0.0},
                   {"group": backend, "speedup": s.speedup, "loss": loss, "interval": interval,
                    "label": f"{s.speedup:.2f}x, {loss:.3f} dB"}]
    name = "PSNR-Y loss (dB)" if result.task == "sr" else "PSNR loss (dB)"
    return {"points": points, "references": list(SR_REFERENCES) if result.task == "sr" else [], "loss_name": name}


def answer_lines(result: PipelineResult, rows: list[dict], max_loss_db: float = MAX_LOSS_DB) -> list[str]:
    """What the report opens with: the verdict, the quality lost against the bar, where it was measured,
    and the speed-up on every other back-end timed."""
    q = "PSNR-Y" if result.task == "sr" else "PSNR"
    loss = rows[0]["psnr"] - rows[2]["psnr"]
    env = result.speed.env or {}
    bar = "met" if loss <= max_loss_db else "**MISSED**"
    lines = [result.verdict.line + ("; the ORIGINAL model is shipped" if result.shipped == "original" else ""),
             f"{q} lost on the held-out photos: {loss:.3f} dB ({rows[0]['psnr']:.3f} -> {rows[2]['psnr']:.3f} dB); "
             f"quality bar {max_loss_db:g} dB: {bar}",
             f"measured on {result.config.backend}, batch 1, input {list(result.example.shape)}, {env.get('threads')} "
             f"threads, malloc={env.get('malloc')}, {env.get('cpu')}"]
    others = [f"{name}: {s.speedup:.2f}x" + (f" ({s.interval[0]:.2f}-{s.interval[1]:.2f})" if s.interval else "")
              for name, s in result.speeds.items() if name != result.config.backend]
    if others:
        lines.append("the same models on the other back-ends (95% interval): " + "; ".join(others))
    if result.config.backend.split(":")[0] in ("torch", "compile") and env.get("malloc") not in (None, "default"):
        lines.append(f"eager PyTorch's figure depends on the allocator ({env.get('malloc')} here, preloaded by the "
                     "CLI); a Python process with glibc's malloc can measure far less, while OpenVINO and ONNX "
                     "Runtime do not depend on it")
    return lines


def build_report_data(result: PipelineResult, rows: list[dict], quick: bool = False,
                      max_loss_db: float = MAX_LOSS_DB) -> dict:
    """The report's data (:func:`convfactor.report.write_report`), with the demo's own figures under ``"demo"``."""
    cfg, s = result.config, result.speed
    title = f"convfactor demo: {cfg.model}, {report_headline(result)}" + (" (QUICK smoke run)" if quick else "")
    data = collect(result.original, result.compressed, result.example, compression_report=result.compression_report,
                   threads=cfg.threads, title=title, model_name=cfg.model)
    data["speed"] = s.to_dict()
    data["backends"] = backend_rows(result.speeds)
    data["latency"] = latency_rows(s)
    q = "PSNR-Y (dB)" if result.task == "sr" else "PSNR (dB)"
    data["quality_name"] = q + " on held-out built-in photos"
    data["tradeoff"] = [{"label": r["label"], "macs": r["macs"], "latency_ms": r["latency_ms"], "quality": r["psnr"]}
                        for r in rows if r["macs"] is not None]
    data["frontier"] = frontier_data(result, rows)
    data["images"] = image_crops(result)
    figures = result.to_dict()
    data["demo"] = {"summary": rows, **{k: figures[k] for k in ("plan_kind", "plan", "quality", "timings_s", "config",
                                                                 "params", "macs")},
                    "speedup": s.speedup, "finetune_loss": [h["loss"] for h in result.finetune_history],
                    "verdict": figures["verdict"], "shipped": result.shipped, "plan_message": result.plan_message}
    data["warnings"] = [w for w in (result.plan_message, None if result.verdict.ok else result.verdict.line) if w]
    data["answer"] = answer_lines(result, rows, max_loss_db)
    data["demo"]["max_loss_db"] = max_loss_db
    return data

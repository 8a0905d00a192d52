"""The same compressed models timed on every runtime back-end, side by side (issue 13).

For each planning back-end (eager PyTorch and ONNX Runtime) EDSR-baseline x2 is planned for a
measured 3x at 256x256 LR, batch 1, 2 threads, on that back-end; fine-tuned as in the ``models``
section; then original and compressed are timed on every back-end (eager, ONNX Runtime,
torch.compile), each against that back-end's own fastest dense form, with a 95% interval.  The
planner's cold and warm planning times (empty vs filled on-disk layer-timing cache) are measured
on the eager back-end.  No GPU is lent to this machine, so there is no CUDA row: the section says so.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from convfactor import models
from convfactor.measure.compare import SpeedComparison
from convfactor.measure.latency import environment
from convfactor.rank import LatencyCache, LatencyConfig, Target, plan
from convfactor.recipes.pipeline import PipelineConfig, compress_finetune_measure, image_layers

from .markdown import heading, table
from .section import Section

TITLE = "Runtimes: the same compressed model on eager PyTorch, ONNX Runtime and torch.compile"
REQUEST = 3.0
#: (model, LR side, fine-tuning steps, batch, patch), and the back-ends planned on / timed on
FULL = dict(model="edsr_baseline_x2", side=256, steps=900, batch=16, patch=32,
            plan_on=("torch", "onnxruntime"), timed_on=("torch", "onnxruntime", "compile"))
QUICK = dict(model="edsr_baseline_x2", side=24, steps=2, batch=2, patch=16,
             plan_on=("torch",), timed_on=("torch", "onnxruntime"))


@dataclass
class Row:
    """One model planned on ``planned_on``, timed on every back-end."""
    planned_on: str
    plan_message: str | None
    plan_s: float
    finetune_s: float
    macs_reduction: float
    psnr_loss_db: float
    verdict: str
    speeds: dict[str, SpeedComparison]


@dataclass
class Results:
    quick: bool
    rows: list[Row]
    planning_s: dict[str, float]          # "cold" / "warm" seconds of the eager latency plan, and layers timed
    env: dict
    gpu: bool


def _config(spec: dict, backend: str, quick: bool) -> PipelineConfig:
    quick_only = dict(planner="budget", train_side=64, speed_repeats=3, threads=1, eval_side=48, eval_limit=2) \
        if quick else {}
    return PipelineConfig(**{**dict(model=spec["model"], speedup=REQUEST, input_size=spec["side"], steps=spec["steps"],
                                    batch_size=spec["batch"], patch_size=spec["patch"], threads=2, progress=False,
                                    backend=backend, report_backends=spec["timed_on"], plan_e2e_rounds=3,
                                    plan_e2e_repeats=3, plan_max_iter=5), **quick_only})


def measure_row(spec: dict, backend: str, quick: bool) -> Row:
    res = compress_finetune_measure(_config(spec, backend, quick), log=lambda *a: None)
    loss = res.quality["original"]["psnr"] - res.quality["compressed"]["psnr"]
    return Row(backend, res.plan_message, res.timings_s.plan, res.timings_s.finetune,
               res.macs.original / res.macs.compressed, loss, res.verdict.line, res.speeds)


def measure_planning(spec: dict, quick: bool) -> dict[str, float]:
    """Seconds of the eager latency plan with an empty, then a filled, on-disk layer-timing cache."""
    model = models.get(spec["model"], pretrained=True).eval()
    x = torch.rand(1, 3, spec["side"], spec["side"], generator=torch.Generator().manual_seed(0))
    cfg = LatencyConfig(threads=1 if quick else 2, repeats=2 if quick else 10, e2e_rounds=1 if quick else 3,
                        e2e_repeats=1 if quick else 3, e2e_max_rounds=1 if quick else 9,
                        max_iter=1 if quick else 5, margin=0.12, **({"ratios": (0.25,)} if quick else {}))
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in ("cold", "warm"):
            cache = LatencyCache(os.path.join(tmp, "latency.json"))
            t0 = time.perf_counter()
            plan(model, x, target=Target("speedup", REQUEST), criterion="latency", exclude=image_layers(model),
                 latency=dataclasses.replace(cfg, cache=cache), progress=False)
            seconds[run] = time.perf_counter() - t0
            seconds[f"{run}_layers_timed"] = cache.misses
    return seconds


def measure(quick: bool = False) -> Results:
    spec = QUICK if quick else FULL
    rows = [measure_row(spec, backend, quick) for backend in spec["plan_on"]]
    return Results(quick, rows, measure_planning(spec, quick), environment(2), torch.cuda.is_available())


def _cells(row: Row, backend: str) -> list:
    s = row.speeds.get(backend)
    if s is None:
        return [row.planned_on, backend, "not timed", "", "", "", "", ""]
    lo, hi = s.interval
    landing = s.speedup / REQUEST
    return [row.planned_on, backend, f"{s.original[s.original_best]['median_ms']:.1f}",
            f"{s.compressed[s.compressed_best]['median_ms']:.1f}", f"**{s.speedup:.2f}x** ({lo:.2f}-{hi:.2f})",
            f"{s.speedup / row.macs_reduction:.2f}", f"{landing:.2f}", "; ".join(s.noise) or "no"]


def render(r: Results) -> str:
    lines = heading(TITLE)
    lines += [f"EDSR-baseline x2, LR input {QUICK['side'] if r.quick else FULL['side']}², batch 1, "
              f"{r.env.get('threads')} threads, fp32, {r.env.get('cpu')}, malloc={r.env.get('malloc')}, "
              f"torch {r.env.get('torch')}. Each speed-up is against that back-end's own fastest dense form; "
              "efficiency = speed-up / MAC reduction; landing = measured / requested (3x).", ""]
    lines += table(["planned on", "timed on", "original ms", "compressed ms", "speed-up (95% interval)",
                    "efficiency", "landing", "noisy"],
                   [_cells(row, b) for row in r.rows for b in row.speeds])
    lines.append("")
    for row in r.rows:
        lines.append(f"- Planned on {row.planned_on}: MACs / {row.macs_reduction:.2f}, PSNR-Y loss "
                     f"{row.psnr_loss_db:.3f} dB after {row.finetune_s / 60:.1f} min of fine-tuning, planning "
                     f"{row.plan_s:.0f} s. Verdict: {row.verdict}."
                     + (f" Planner: {row.plan_message}." if row.plan_message else ""))
    p = r.planning_s
    lines.append(f"- Planning time (eager, empty vs filled layer-timing cache): {p['cold']:.1f} s cold "
                 f"({p['cold_layers_timed']} layer timings), {p['warm']:.1f} s warm ({p['warm_layers_timed']}; only "
                 "the end-to-end checks are timed again). Targets: <= 90 s cold, <= 15 s warm at 256².")
    if not r.gpu:
        lines.append("- No GPU was available to this run, so there is no CUDA row.")
    if r.quick:
        lines.append("- Quick mode: tiny input, MACs-budget plan, 2 fine-tuning steps; the numbers mean nothing.")
    return "\n".join(lines) + "\n"


SECTION = Section("runtimes", TITLE, measure, render)

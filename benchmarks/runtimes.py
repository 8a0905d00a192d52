"""The same compressed models timed on every runtime back-end, side by side (issues 13 and 21).

For each back-end asked for (default: eager PyTorch, ONNX Runtime, torch.compile, OpenVINO, and
OpenVINO bf16 where the CPU runs bf16 natively) EDSR-baseline x2
is planned for a measured 3x at 256x256 LR, batch 1, 2 threads, on that back-end (a band that lands
within 10% above the request); fine-tuned as in the ``models`` section; then original and
compressed are timed on every back-end, each against that back-end's own fastest dense form, with a
95% interval.  Also measured: the planner's cold and warm planning times (empty vs filled on-disk
timing cache, default settings), and the EDSR and DnCNN plans under each CPU allocator, each in a
fresh process.  No GPU is lent to this machine, so there is no CUDA row: the section says so.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch

from convfactor import models
from convfactor.measure.allocator import FAST_ALLOCATORS, JEMALLOC_CONF
from convfactor.measure.backends import BF16_FLAGS
from convfactor.measure.compare import SpeedComparison
from convfactor.measure.latency import environment
from convfactor.rank import LatencyCache, LatencyConfig, Target, plan
from convfactor.recipes.pipeline import PipelineConfig, compress_finetune_measure, image_layers
from convfactor.utils import cpu_has

from .fresh_timing import compare_in_fresh_process
from .int8 import runtime_versions
from .markdown import heading, table
from .pipeline_settings import bench_config
from .section import Section

TITLE = "Runtimes: the same compressed model on eager PyTorch, ONNX Runtime, torch.compile and OpenVINO"
REQUEST = 3.0
BACKENDS = ("torch", "onnxruntime", "compile", "openvino") + (
    ("openvino:precision=bf16",) if cpu_has(*BF16_FLAGS) else ())
#: the fresh-process allocator table's back-ends (OpenVINO: it needs no allocator, and no longer aborts under one)
ALLOCATOR_BACKENDS = ("torch", "onnxruntime", "openvino")
#: (model, LR side, fine-tuning steps, batch, patch); the plan margin 0.06 accepts 3.09-3.27x (within 10%)
FULL = dict(model="edsr_baseline_x2", side=256, steps=900, batch=16, patch=32, margin=0.06)
QUICK = dict(model="edsr_baseline_x2", side=24, steps=2, batch=2, patch=16, margin=0.06)
#: the allocator table: (label, malloc mode of the fresh process, environment); None paths are filled in
ALLOCATORS = (("glibc default", "default", {}), ("retain (mallopt)", "retain", {}),
              ("jemalloc, shipped settings", "preload", {"LD_PRELOAD": "jemalloc", "MALLOC_CONF": ""}),
              ("jemalloc, purging off (auto's 2nd choice)", "preload", {"LD_PRELOAD": "jemalloc", "MALLOC_CONF": JEMALLOC_CONF}),
              ("tcmalloc (auto's 1st choice)", "preload", {"LD_PRELOAD": "tcmalloc"}))


@dataclass
class Row:
    """One model planned on ``planned_on``, timed on every back-end (``failed``: why it has no figures)."""
    planned_on: str
    plan_message: str | None = None
    plan_s: float = 0.0
    finetune_s: float = 0.0
    macs_reduction: float = 0.0
    psnr_loss_db: float = 0.0
    verdict: str = ""
    speeds: dict[str, SpeedComparison] = dataclasses.field(default_factory=dict)
    failed: str | None = None
    #: PSNR-Y lost through each lower-precision runtime: dense fp32 (PyTorch) - compressed served by it
    runtime_loss_db: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass
class Results:
    quick: bool
    rows: list[Row]
    merge_only: dict                      # the dense model merged (exact), timed against itself per back-end
    planning_s: dict[str, float]          # "cold" / "warm" seconds of the eager latency plan, and layers timed
    allocators: list[dict]                # one per (model, back-end, allocator): label, speed-up, interval, ms
    env: dict
    gpu: bool


def _config(spec: dict, backend: str, timed_on: tuple[str, ...], quick: bool) -> PipelineConfig:
    return bench_config(quick, model=spec["model"], speedup=REQUEST, input_size=spec["side"], steps=spec["steps"],
                        batch_size=spec["batch"], patch_size=spec["patch"], backend=backend, report_backends=timed_on,
                        plan_margin=spec["margin"])


def _progress(backend: str, quiet: bool):
    """The pipeline's step lines on stderr, tagged with the row (a full run takes most of an hour)."""
    if quiet:
        return lambda *a: None
    return lambda line: print(f"  [runtimes/{backend}] {line}", file=sys.stderr, flush=True)


def measure_row(spec: dict, backend: str, timed_on: tuple[str, ...], quick: bool) -> tuple[Row, object]:
    """The row planned on ``backend``, and its compressed model (None when it failed)."""
    try:
        res = compress_finetune_measure(_config(spec, backend, timed_on, quick), log=_progress(backend, quick))
    except Exception:  # noqa: BLE001 - one back-end failing must not lose the others' rows
        return Row(backend, failed=traceback.format_exc(limit=3).strip().splitlines()[-1]), None
    loss = res.quality["original"]["psnr"] - res.quality["compressed"]["psnr"]
    through = {stage.split("@", 1)[1]: res.quality["original"]["psnr"] - q["psnr"]
               for stage, q in res.quality.items() if stage.startswith("compressed@")}
    return Row(backend, res.plan_message, res.timings_s.plan, res.timings_s.finetune,
               res.macs.original / res.macs.compressed, loss, res.verdict.line, res.speeds,
               runtime_loss_db=through), res.compressed


def measure_planning(spec: dict, quick: bool) -> dict[str, float]:
    """Seconds of the eager latency plan (the planner's defaults, as ``convfactor plan`` runs it) with an
    empty, then a filled, on-disk timing cache."""
    model = models.get(spec["model"], pretrained=True).eval()
    x = torch.rand(1, 3, spec["side"], spec["side"], generator=torch.Generator().manual_seed(0))
    cfg = LatencyConfig(threads=1, repeats=2, e2e_rounds=1, e2e_repeats=1, e2e_max_rounds=1, max_iter=1,
                        ratios=(0.25,)) if quick else LatencyConfig(threads=2)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in ("cold", "warm"):
            cache = LatencyCache(os.path.join(tmp, "latency.json"))
            t0 = time.perf_counter()
            p = plan(model, x, target=Target("speedup", REQUEST), criterion="latency",
                     latency=dataclasses.replace(cfg, cache=cache), progress=False)
            seconds[run] = time.perf_counter() - t0
            seconds[f"{run}_layers_timed"] = cache.misses
            seconds[f"{run}_checks"] = len(p.summary.history or [])
            seconds[f"{run}_speedup"] = p.summary.measured_speedup
    return seconds


def _dncnn_model(quick: bool):
    """DnCNN latency-planned for 3x on eager PyTorch (not fine-tuned: speed does not depend on the weights)."""
    side = 24 if quick else 256
    model = models.get("dncnn", pretrained=True).eval()
    x = torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(0))
    cfg = LatencyConfig(threads=2, margin=0.06, **(dict(repeats=2, e2e_rounds=1, e2e_max_rounds=1, max_iter=1)
                                                    if quick else {}))
    p = plan(model, x, target=Target("speedup", REQUEST), criterion="latency", exclude=image_layers(model),
             latency=cfg, progress=False)
    return p.apply(model, allow_unreachable=True)[0], tuple(x.shape)


def _allocator_env(env: dict) -> dict | None:
    """``env`` with a library name replaced by its installed path; None when it is not installed."""
    if "LD_PRELOAD" not in env:
        return {"LD_PRELOAD": "", "MALLOC_CONF": ""}
    paths = [p for p in FAST_ALLOCATORS[env["LD_PRELOAD"]] if os.path.isfile(p)]
    return {**env, "LD_PRELOAD": paths[0]} if paths else None


def measure_allocators(edsr, quick: bool) -> list[dict]:
    """Original vs compressed EDSR and DnCNN in a fresh process per allocator, eager and ONNX Runtime."""
    cases = [("edsr_baseline_x2", edsr, (1, 3) + (QUICK["side"] if quick else FULL["side"],) * 2),
             ("dncnn", *_dncnn_model(quick))]
    settings = ALLOCATORS[:2] if quick else ALLOCATORS
    out = []
    for name, compressed, shape in cases:
        if compressed is None:
            continue
        for backend in ALLOCATOR_BACKENDS:
            for label, malloc, env in settings:
                entry = dict(model=name, backend=backend, allocator=label)
                child = _allocator_env(env)
                if child is None:
                    out.append({**entry, "missing": f"{env['LD_PRELOAD']} is not installed"})
                    continue
                r = compare_in_fresh_process(name, compressed, shape, threads=1 if quick else 2,
                                             repeats=2 if quick else 9, malloc=malloc, backend=backend, env=child)
                out.append({**entry, "speedup": r["speedup"], "interval": r["interval"], "recorded": r["env"]["malloc"],
                            "original_ms": r["original"][r["original_best"]]["median_ms"],
                            "compressed_ms": r["compressed"][r["compressed_best"]]["median_ms"],
                            "noise": r.get("noise") or []})
    return out


def measure(quick: bool = False, backends: tuple[str, ...] = BACKENDS) -> Results:
    spec = QUICK if quick else FULL
    backends = tuple(b for b in backends if not (quick and b == "compile")) or ("torch",)
    planned_on = tuple(dict.fromkeys((backends[0], backends[-1]))) if quick else backends   # quick: two rows
    rows, compressed = [], {}
    for backend in planned_on:
        row, model = measure_row(spec, backend, backends, quick)
        rows.append(row)
        compressed[backend] = model
    merge_only = measure_merge_only(spec, backends, quick)
    planning = measure_planning(spec, quick)
    allocators = measure_allocators(compressed.get("torch"), quick)
    return Results(quick, rows, merge_only, planning, allocators, environment(2), torch.cuda.is_available())


def measure_merge_only(spec: dict, backends: tuple[str, ...], quick: bool) -> dict:
    """The dense model against itself after :func:`convfactor.merge` alone (exact: the upsampler's
    conv -> PixelShuffle -> HR tail conv becomes LR convs + PixelShuffle), per back-end, interleaved;
    with its MACs and the largest output difference (float32) on the example."""
    from convfactor import count, merge
    from convfactor.measure.compare import compare_speed
    model = models.get(spec["model"], pretrained=True).eval()
    x = torch.rand(1, 3, spec["side"], spec["side"], generator=torch.Generator().manual_seed(0))
    merged, report = merge(model, x)
    with torch.no_grad():
        diff = float((merged(x) - model(x)).abs().max())
    out = {"macs": (count(model, x)["macs"], count(merged, x)["macs"]), "max_abs_diff": diff,
           "merged": [" + ".join(g.paths) for g in report.merged], "speeds": {},
           "skipped": [f"{' + '.join(k.paths)}: {k.reason}" for k in report.skipped]}
    for backend in (backends if report.merged else ()):          # nothing merged: nothing to time
        try:
            out["speeds"][backend] = compare_speed(model, merged, x, threads=1 if quick else 2, backend=backend,
                                                   repeats=3 if quick else 15, rounds=3,
                                                   max_rounds=3 if quick else 8, count_macs=False)
        except Exception as exc:  # noqa: BLE001 - one runtime failing must not lose the others
            out["speeds"][backend] = f"failed: {str(exc).splitlines()[0][:160]}"
    return out


def _merge_lines(m: dict) -> list[str]:
    before, after = m["macs"]
    lines = ["", "### The merge alone (the dense model, exact: 0.000 dB)", "",
             f"`convfactor.merge` on the dense model: {'; '.join(m['merged']) or 'nothing merged'}. MACs "
             f"{before / 1e9:.2f} G -> {after / 1e9:.2f} G (/ {before / after:.3f}); largest output difference "
             f"{m['max_abs_diff']:.1e} (float32 round-off). Each line: dense vs merged dense on one back-end, "
             "interleaved, 95% interval."]
    if not m["merged"]:
        return lines + ["", "Nothing to time: no exact merge lowers the dense model's MACs. Pairs left as they are: "
                        + "; ".join(m["skipped"][:4]) + "."]
    lines.append("")
    rows = []
    for backend, s in m["speeds"].items():
        if isinstance(s, str):
            rows.append([backend, s, "", "", ""])
            continue
        lo, hi = s.interval
        rows.append([backend, f"{s.original[s.original_best]['median_ms']:.1f}",
                     f"{s.compressed[s.compressed_best]['median_ms']:.1f}",
                     f"**{s.speedup:.2f}x** ({lo:.2f}-{hi:.2f})", "; ".join(s.noise) or "no"])
    return lines + table(["back-end", "dense ms", "merged ms", "speed-up (95%)", "noisy"], rows)


def _cells(row: Row, backend: str) -> list:
    s = row.speeds.get(backend)
    if s is None:
        return [row.planned_on, backend, "not timed", "", "", "", "", ""]
    lo, hi = s.interval
    landing = s.speedup / REQUEST
    efficiency = "n/a (precision)" if s.env.get("baseline") else f"{s.speedup / row.macs_reduction:.2f}"
    return [row.planned_on, backend, f"{s.original[s.original_best]['median_ms']:.1f}",
            f"{s.compressed[s.compressed_best]['median_ms']:.1f}", f"**{s.speedup:.2f}x** ({lo:.2f}-{hi:.2f})",
            efficiency, f"{landing:.2f}", "; ".join(s.noise) or "no"]


def _allocator_lines(entries: list[dict]) -> list[str]:
    lines = ["", "### The CPU allocator", "",
             "Each line: a fresh process, original vs the compressed model (EDSR: the eager row's fine-tuned "
             "model; DnCNN: latency-planned for 3x on eager, not fine-tuned), fastest forms, interleaved rounds. "
             "`recorded` is what the process reported having loaded.", ""]
    rows = []
    for e in entries:
        if "missing" in e:
            rows.append([e["model"], e["backend"], e["allocator"], "not measured: " + e["missing"], "", "", "", ""])
            continue
        lo, hi = e["interval"]
        rows.append([e["model"], e["backend"], e["allocator"], e["recorded"], f"{e['original_ms']:.1f}",
                     f"{e['compressed_ms']:.1f}", f"**{e['speedup']:.2f}x** ({lo:.2f}-{hi:.2f})",
                     "; ".join(e["noise"]) or "no"])
    return lines + table(["model", "back-end", "allocator", "recorded", "original ms", "compressed ms",
                          "speed-up (95%)", "noisy"], rows)


def render(r: Results) -> str:
    lines = heading(TITLE)
    lines += [f"EDSR-baseline x2, LR input {QUICK['side'] if r.quick else FULL['side']}², batch 1, "
              f"{r.env.get('threads')} threads, fp32 unless a back-end names its precision, {r.env.get('cpu')}, "
              f"malloc={r.env.get('malloc')}, torch {r.env.get('torch')}, "
              f"{', '.join(runtime_versions().values())}. Each speed-up is "
              "against that back-end's own fastest dense form at the same precision; a row `B vs A` times the "
              "compressed model on B against the dense model on A (a lower precision against the dense fp32 model "
              "it replaces). A plan on a lower precision first credits the dense model at that precision against "
              "dense fp32, and asks low rank only for the rest of the request. Efficiency = speed-up / MAC "
              "reduction (withheld across precisions); landing = measured / requested (3x).", ""]
    lines += table(["planned on", "timed on", "original ms", "compressed ms", "speed-up (95% interval)",
                    "efficiency", "landing", "noisy"],
                   [_cells(row, b) for row in r.rows for b in row.speeds])
    lines.append("")
    for row in r.rows:
        if row.failed:
            lines.append(f"- Planned on {row.planned_on}: **FAILED**: {row.failed}")
            continue
        through = "".join(f"; through {b}: {v:.3f} dB" for b, v in row.runtime_loss_db.items())
        lines.append(f"- Planned on {row.planned_on}: MACs / {row.macs_reduction:.2f}, PSNR-Y loss "
                     f"{row.psnr_loss_db:.3f} dB in PyTorch fp32{through} (each against the dense fp32 model in "
                     f"PyTorch) after {row.finetune_s / 60:.1f} min of fine-tuning, planning "
                     f"{row.plan_s:.0f} s. Verdict: {row.verdict}."
                     + (f" Planner: {row.plan_message}." if row.plan_message else ""))
    p = r.planning_s
    lines.append(f"- Planning time, eager, the planner's defaults (`convfactor plan ... --target speedup=3x`), "
                 f"in-process: {p['cold']:.1f} s cold ({p['cold_layers_timed']} timings, {p['cold_checks']} "
                 f"end-to-end checks, measured {p['cold_speedup']:.2f}x), {p['warm']:.1f} s warm "
                 f"({p['warm_layers_timed']} timings, {p['warm_checks']} checks, {p['warm_speedup']:.2f}x). "
                 f"Targets: <= 90 s cold, <= 15 s warm at 256² "
                 f"({'met' if p['cold'] <= 90 and p['warm'] <= 15 else '**MISSED**'}).")
    if not r.gpu:
        lines.append("- No GPU was available to this run, so there is no CUDA row.")
    if r.quick:
        lines.append("- Quick mode: tiny input, MACs-budget plan, 2 fine-tuning steps; the numbers mean nothing.")
    lines += _merge_lines(r.merge_only)
    lines += _allocator_lines(r.allocators)
    return "\n".join(lines) + "\n"


SECTION = Section("runtimes", TITLE, measure, render, backends=BACKENDS)

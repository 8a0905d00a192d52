"""The speed / quality frontier: measured speed-up against PSNR loss, per approach and runtime (issues 15,
21 and 22).

For EDSR-baseline x2 (LR 256², batch 1, 2 threads), DnCNN (256², grey, sigma 25) and the published SRMD x2
(LR 256²), each point (an approach on a back-end at a requested speed-up, :data:`FULL`) runs through the
whole pipeline (plan, factorize, fine-tune with distillation, PSNR on the held-out photos, end-to-end
timing against the original's fastest form in the same process):

* ``uniform``: channel SVD at per-layer MACs = 1 / request (a MACs target: its x is what it measures);
* ``latency planner``: the measured-latency planner minimizing the kernel error (the weight-space
  proxy): the single-stage baseline every refinement is compared with;
* ``data-aware``: the same planner minimizing each layer's output error on training-photo patches (for
  SRMD also fitting the factors to them layer by layer: the sequential data-aware fit);
* ``multi-stage``: two rounds of plan / fine-tune / fold back (MUSCO), the weight proxy;
* ``+ bf16`` / ``+ int8``: a model's ``stack`` approach's OpenVINO model served by OpenVINO in bf16 (where
  the CPU runs it natively) and in NNCF int8 (calibrated on training-photo crops), timed against
  OpenVINO's dense fp32 model and scored through OpenVINO.

Every point of a model has the same fine-tuning budget.  Each figure of :data:`FIGURES` is a Pareto plot
(``figures/frontier.png``: EDSR with SRMD x2 beside it; ``figures/frontier_dncnn.png``); the SR one adds
published SR points as grey marks: they are on other data and none is a measured speed-up, and their
labels say so.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from dataclasses import dataclass

from convfactor import models
from convfactor.measure.latency import environment
from convfactor.models import published
from convfactor.recipes.pipeline import PipelineConfig, compress_finetune_measure
from convfactor.report.figures import frontier as frontier_figure
from convfactor.report.published import SR_REFERENCES
from convfactor.utils import BF16_FLAGS, cpu_has

from .int8 import runtime_versions
from .markdown import heading, table
from .pipeline_settings import bench_config
from .section import Section

TITLE = "Frontier: measured speed-up against quality loss, per approach and runtime"
#: approach -> the pipeline settings that make it (on top of the model's spec)
APPROACHES = {
    "uniform": dict(planner="fixed"),
    "latency planner": dict(planner="latency"),
    "data-aware": dict(planner="latency", error="output"),
    "multi-stage": dict(planner="latency", stages=2),
}
BASELINE = "latency planner"
#: the published SRMD x2 (issue 22): factors fitted layer by layer to training-photo crops (the sequential
#: data-aware fit), fine-tuned at Adam 5e-6 on 48² patches (the EDSR rate wrecks the well-trained network)
SRMD = {"fit": "data", "lr": 5e-6}
#: the lower precisions stacked on a baseline point planned on that runtime (bf16 only where the CPU runs
#: it natively): timed against the runtime's dense fp32 model, scored through the runtime itself
STACKED = {"openvino": ("bf16", "int8")}
#: per model: (approach, back-end planned and timed on, requested speed-up) points.  EDSR: the planner on
#: eager (the last round's baseline), then the planner and the data-aware planner on OpenVINO, the
#: fastest runtime here, with bf16 and int8 stacked on its 3x point, and the planner at 5x; DnCNN on
#: OpenVINO.  SRMD x2 (published weights): the data-aware planner and fit at 2x on eager and at 3x on OpenVINO,
#: with the lower precisions stacked on the latter.  (The uniform MACs cut and multi-stage were measured in the last round, on eager; they are
#: kept as approaches, and the quick run covers them.)  600 / 500 fine-tuning steps per point (about 5 and
#: 4 minutes on 2 cores, under the issue's 15) keep the section near 50 minutes.
FULL = [dict(model="edsr_baseline_x2", side=256, steps=600, batch=16, patch=32, stack=BASELINE,
             points=((BASELINE, "torch", 3.0), (BASELINE, "openvino", 3.0), ("data-aware", "openvino", 3.0),
                     (BASELINE, "openvino", 5.0))),
        dict(model="dncnn", side=256, steps=500, batch=16, patch=40,
             points=((BASELINE, "openvino", 3.0), ("data-aware", "openvino", 3.0))),
        dict(model="srmd_x2", side=256, steps=600, batch=8, patch=48, stack="data-aware", settings=SRMD,
             points=(("data-aware", "torch", 2.0), ("data-aware", "openvino", 3.0)))]
QUICK = [dict(model="edsr_baseline_x2", side=24, steps=2, batch=2, patch=16, stack=BASELINE,
              points=(*((a, "torch", 3.0) for a in APPROACHES), (BASELINE, "openvino", 3.0)))]
#: (model, request, loss bound dB, back-end): the issues' targets (15: eager; 21: OpenVINO fp32; 22: SRMD x2 on
#: eager, and on OpenVINO in any precision, against its dense fp32: a back-end ending in ``+``)
TARGETS = (("edsr_baseline_x2", 3.0, 0.05, "torch"), ("edsr_baseline_x2", 3.0, 0.15, "openvino"),
           ("edsr_baseline_x2", 5.0, 0.15, "openvino"), ("dncnn", 3.0, 0.10, "openvino"),
           ("srmd_x2", 2.0, 0.05, "torch"), ("srmd_x2", 3.0, 0.15, "openvino+"))
#: a lower precision stacked on low rank: speed-up against the runtime's dense fp32, loss bound dB (issue 21)
STACKED_TARGET = (6.0, 0.20)


def stacked_label(precision: str, approach: str = BASELINE) -> str:
    """The approach name of a lower precision stacked on ``approach``: ``'latency planner + bf16'``."""
    return f"{approach} + {precision}"


@dataclass
class Point:
    """One approach at one request: measured speed-up (95% interval) on ``backend`` and the loss."""
    model: str
    approach: str
    request: float
    backend: str = "torch"
    speedup: float = 0.0
    interval: tuple[float, float] | None = None
    loss_db: float = 0.0
    loss_before_db: float | None = None    # before fine-tuning (what the plan alone costs)
    macs_reduction: float | None = None
    finetune_s: float = 0.0
    plan_s: float = 0.0
    noise: list[str] = dataclasses.field(default_factory=list)
    planner: str | None = None             # the planner's own warning (e.g. unreachable)
    failed: str | None = None


@dataclass
class Results:
    quick: bool
    points: list[Point]
    env: dict
    weights: dict                          # model -> held-out quality of the shipped weights (original)


def stacked_backends(backend: str, spec: dict, approach: str) -> tuple[str, ...]:
    """The lower-precision back-ends stacked on a point of ``spec`` planned on ``backend`` by ``approach``:
    none unless it is the spec's ``stack`` approach; those the CPU can run (bf16 needs AVX512-BF16 or AMX)."""
    if approach != spec.get("stack"):
        return ()
    precisions = [p for p in STACKED.get(backend, ()) if p != "bf16" or cpu_has(*BF16_FLAGS)]
    return tuple(f"{backend}:precision={p}" for p in precisions)


def _config(spec: dict, approach: str, backend: str, request: float, quick: bool) -> PipelineConfig:
    return bench_config(quick, model=spec["model"], speedup=request, input_size=spec["side"], steps=spec["steps"],
                        batch_size=spec["batch"], patch_size=spec["patch"], backend=backend,
                        report_backends=stacked_backends(backend, spec, approach), plan_margin=0.06,
                        speed_max_rounds=8, **APPROACHES[approach], **spec.get("settings", {}))


def _log(tag: str, quiet: bool):
    if quiet:
        return lambda *a: None
    return lambda line: print(f"  [frontier/{tag}] {line}", file=sys.stderr, flush=True)


def measure_point(spec: dict, approach: str, backend: str, request: float, quick: bool
                  ) -> tuple[list[Point], object]:
    """One approach at one request through the whole pipeline on ``backend``: its point, then one point per
    stacked lower precision (:func:`stacked_points`); and the pipeline's result."""
    tag = f"{spec['model']}/{approach}/{backend}/{request:g}x"
    point = Point(spec["model"], approach, request, backend=backend)
    try:
        res = compress_finetune_measure(_config(spec, approach, backend, request, quick), log=_log(tag, quick))
    except Exception:  # noqa: BLE001 - one failed point must not lose the others
        point.failed = traceback.format_exc(limit=3).strip().splitlines()[-1]
        return [point], None
    q = res.quality
    point.speedup, point.interval, point.noise = res.speed.speedup, res.speed.interval, list(res.speed.noise)
    point.loss_db = q["original"]["psnr"] - q["compressed"]["psnr"]
    point.loss_before_db = q["original"]["psnr"] - q["compressed_before_finetune"]["psnr"]
    point.macs_reduction = res.macs.original / res.macs.compressed
    point.finetune_s, point.plan_s, point.planner = res.timings_s.finetune, res.timings_s.plan, res.plan_message
    return [point, *stacked_points(res, point)], res


def stacked_points(res, base: Point) -> list[Point]:
    """Per lower-precision report back-end of ``res``: the fine-tuned model on that precision timed against
    the dense fp32 model on the same runtime (the pipeline's ``B vs A`` row), its loss scored through the
    runtime against the original's fp32 quality.  A precision that could not be timed or scored is a
    failed point, saying which."""
    points = []
    for backend in res.config.report_backends:
        precision = backend.split("precision=", 1)[1]
        key, stage = f"{backend} vs {base.backend}", f"compressed@{backend}"
        point = Point(base.model, stacked_label(precision, base.approach), base.request, backend=key,
                      macs_reduction=base.macs_reduction, finetune_s=base.finetune_s)
        speed, quality = res.speeds.get(key), res.quality.get(stage)
        if speed is None or quality is None:
            point.failed = f"{backend}: {'not timed' if speed is None else 'not scored'} here"
        else:
            point.speedup, point.interval, point.noise = speed.speedup, speed.interval, list(speed.noise)
            point.loss_db = res.quality["original"]["psnr"] - quality["psnr"]
        points.append(point)
    return points


def _weights(name: str) -> dict:
    """The shipped weights' training steps and held-out PSNR, as their JSON records them."""
    path = models.WEIGHTS_DIR / f"{name}.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    recipe = meta.get("recipe", {})
    steps = sum(s.get("steps", 0) for s in models.training_stages(recipe)) if recipe else None
    held_out = meta.get("held_out", {})
    mean = held_out.get("mean", held_out)           # older files nest the means under "mean"
    return {"steps": steps, "psnr": mean.get("psnr_y", mean.get("psnr"))}


def measure(quick: bool = False) -> Results:
    points = []
    for spec in QUICK if quick else FULL:
        for approach, backend, request in spec["points"]:
            points += measure_point(spec, approach, backend, request, quick)[0]
    weights = {spec["model"]: _weights(spec["model"]) for spec in (QUICK if quick else FULL)}
    return Results(quick, points, environment(2, **runtime_versions()), weights)


# ---------------------------------------------------------------------------------------------- render
def _cells(p: Point) -> list:
    if p.failed:
        return [p.model, p.approach, f"{p.request:g}x", p.backend, f"FAILED: {p.failed}", "", "", "", "", ""]
    lo, hi = p.interval or (float("nan"), float("nan"))
    before = "" if p.loss_before_db is None else f"{p.loss_before_db:.3f}"
    return [p.model, p.approach, f"{p.request:g}x", p.backend, f"**{p.speedup:.2f}x** ({lo:.2f}-{hi:.2f})",
            f"{p.macs_reduction:.2f}" if p.macs_reduction else "", before, f"**{p.loss_db:.3f}**",
            f"{p.finetune_s / 60:.1f}", "; ".join(p.noise) or "no"]


def _on_backend(p: Point, backend: str) -> bool:
    """Whether ``p`` counts for a target on ``backend``: that back-end exactly, or with a trailing ``+``, that
    runtime in any precision timed against its own dense fp32 (``'openvino:precision=bf16 vs openvino'``)."""
    if not backend.endswith("+"):
        return p.backend == backend
    return p.backend == backend[:-1] or _stacked_on(p, backend[:-1])


def _stacked_on(p: Point, runtime: str) -> bool:
    """Whether ``p`` is a lower precision of ``runtime`` timed against its dense fp32 (:func:`stacked_points`)."""
    return p.backend.startswith(f"{runtime}:precision=") and p.backend.endswith(f" vs {runtime}")


def _where(backend: str) -> str:
    if backend == "torch":
        return "eager"
    return f"{backend[:-1]}, any precision, against its dense fp32" if backend.endswith("+") else f"{backend} fp32"


def target_lines(points: list[Point]) -> list[str]:
    """Each target: met or MISSED by the best point on its back-end (interval's lower edge >= the speed-up,
    loss within the bound), and the single-stage weight-proxy point at the same request beside it; a
    target with no point measured says so.  Then the stacked-precision target."""
    ok = [p for p in points if not p.failed]
    lines = []
    for model, speed, bound, backend in TARGETS:
        mine = [p for p in ok if p.model == model and _on_backend(p, backend)]
        where = _where(backend)
        if not mine:
            if any(p.model == model for p in points):
                lines.append(f"- {model}: >= {speed:g}x at <= {bound:g} dB ({where}): not measured (no point).")
            continue
        hits = [p for p in mine if p.interval and p.interval[0] >= speed and p.loss_db <= bound]
        base = [p for p in mine if p.approach == BASELINE and p.request == speed]
        best = max(hits, key=lambda p: p.speedup) if hits else None
        verdict = (f"met by {best.approach} ({best.speedup:.2f}x, {best.loss_db:.3f} dB)" if best else
                   f"**MISSED** ({_nearest(mine, speed)})")
        ref = (f"; single-stage weight proxy at {speed:g}x: {base[0].speedup:.2f}x, {base[0].loss_db:.3f} dB"
               if base else "")
        lines.append(f"- {model}: >= {speed:g}x at <= {bound:g} dB ({where}): {verdict}{ref}.")
    return lines + stacked_target_lines(ok)


def _nearest(mine: list[Point], speed: float) -> str:
    """The point nearest a missed target: the least loss among those fast enough, else the fastest."""
    fast = [p for p in mine if p.interval and p.interval[0] >= speed]
    p = min(fast, key=lambda p: p.loss_db) if fast else max(mine, key=lambda p: p.speedup)
    return (f"{'least loss at that speed' if fast else 'fastest'}: {p.approach} on {p.backend}, {p.speedup:.2f}x, "
            f"{p.loss_db:.3f} dB")


def stacked_target_lines(ok: list[Point]) -> list[str]:
    """The stacked-precision target (:data:`STACKED_TARGET`), judged per model and runtime on its best point."""
    speed, bound = STACKED_TARGET
    lines = []
    for model in dict.fromkeys(p.model for p in ok):
        for runtime in STACKED:
            mine = [p for p in ok if p.model == model and _stacked_on(p, runtime)]
            if not mine:
                continue
            hits = [p for p in mine if p.interval and p.interval[0] >= speed and p.loss_db <= bound]
            best = max(hits or mine, key=lambda p: p.speedup)
            lines.append(f"- {model}, {runtime} with a lower precision stacked >= {speed:g}x against its dense fp32 "
                         f"at <= {bound:g} dB: {'met by ' + best.approach if hits else '**MISSED**'} ({best.request:g}x "
                         f"plan: {best.speedup:.2f}x, {best.loss_db:.3f} dB lost).")
    return lines


def _loss_change(saved_db: float) -> str:
    """``saved_db`` = baseline loss - this loss, in words: positive is a gain."""
    if abs(saved_db) < 5e-4:
        return "the same loss"
    return f"{abs(saved_db):.3f} dB {'less' if saved_db > 0 else 'more'} lost"


def gain_lines(points: list[Point]) -> list[str]:
    """What each refinement bought against the single-stage weight-proxy point at the same request on the
    same back-end; and what the runtime bought: the planner on each runtime against the planner on eager."""
    ok = {(p.model, p.approach, p.request, p.backend): p for p in points if not p.failed}
    lines = []
    for (model, approach, request, backend), p in ok.items():
        base = ok.get((model, BASELINE, request, backend))
        if approach == BASELINE:
            base, approach = ok.get((model, BASELINE, request, "torch")), f"{BASELINE} on {backend}"
            if backend == "torch" or base is None:
                continue
        elif base is None:
            continue
        lines.append(f"- {model} at {request:g}x, {approach} vs {base.approach} on {base.backend}: speed-up "
                     f"{p.speedup:.2f}x vs {base.speedup:.2f}x, MACs / {p.macs_reduction or 0:.2f} vs "
                     f"{base.macs_reduction or 0:.2f}, loss {p.loss_db:.3f} vs {base.loss_db:.3f} dB "
                     f"({_loss_change(base.loss_db - p.loss_db)})"
                     + (f"; before fine-tuning {p.loss_before_db:.3f} vs {base.loss_before_db:.3f} dB"
                        if p.loss_before_db is not None and base.loss_before_db is not None else "") + ".")
    return lines


def _own_settings_line(spec: dict) -> str:
    """What a model's points do differently from the others (its ``settings``), and their fine-tuning budget."""
    settings = spec["settings"]
    fit = ("factors fitted layer by layer to training-photo crops (the sequential data-aware fit)"
           if settings.get("fit") == "data" else "factors fitted to the weights")
    origin = "published weights; " if spec["model"] in published.FILES else ""
    return (f"- {spec['model']}: {origin}{fit}; fine-tuned {spec['steps']} steps, batch {spec['batch']}, "
            f"{spec['patch']}² patches, Adam {settings.get('lr', 'default rate')}.")


def render(r: Results) -> str:
    lines = heading(TITLE)
    side = QUICK[0]["side"] if r.quick else FULL[0]["side"]
    lines += [f"LR / input {side}², batch 1, {r.env.get('threads')} threads, fp32 unless a back-end names its "
              f"precision, {r.env.get('cpu')}, malloc={r.env.get('malloc')}, torch {r.env.get('torch')}, "
              f"{r.env.get('onnxruntime', 'onnxruntime -')}, {r.env.get('openvino', 'openvino -')}. A back-end `B vs A` "
              "is the fine-tuned model on the lower precision B timed against the dense model on A, its loss "
              "scored through B against the original in fp32. Every point went through the whole pipeline: "
              "plan, factorize (image-facing convs dense), fine-tune with distillation (same steps for every "
              "approach; multi-stage splits them over its stages), PSNR(-Y) on the held-out photos, then the "
              "end-to-end speed-up against the same back-end's fastest dense form in the same process (median of "
              "interleaved rounds, 95% interval). `uniform` is a MACs target; its x is what it measured.", ""]
    for name, w in r.weights.items():
        if w.get("steps") and w.get("psnr") is not None:
            lines.append(f"- {name}: shipped weights trained {w['steps']} steps, held-out PSNR"
                         f"{'-Y' if name.startswith('edsr') else ''} {w['psnr']:.3f} dB.")
    lines += [_own_settings_line(spec) for spec in (QUICK if r.quick else FULL) if spec.get("settings")]
    lines += [""] + table(["model", "approach", "request", "back-end", "speed-up (95%)", "MACs /", "loss before FT dB",
                    "loss dB", "FT min", "noisy"], [_cells(p) for p in r.points])
    shown = list(_figure_models(r))
    lines += ["", *(f"![{name}](figures/{name}.png)" for name in shown), "",
              "**Targets**", "", *target_lines(r.points), "",
              "**What each refinement bought** (same request, same fine-tuning budget)", "", *gain_lines(r.points)]
    for p in r.points:
        if p.planner:
            lines.append(f"- Planner, {p.model} {p.approach} {p.request:g}x: {p.planner}.")
    lines += ["", "Grey marks in the figure are published points on other networks and data; none is a measured "
              "speed-up (Li et al.'s x is a parameter ratio; Sedky & Hosmer give no speed figure, so they are lines)."]
    if r.quick:
        lines.append("- Quick mode: tiny inputs, MACs-budget plans, 2 fine-tuning steps; the numbers mean nothing.")
    return "\n".join(lines) + "\n"


#: model -> (figure name, title stem, y label, published marks): SRMD x2 is drawn beside EDSR x2 (same task,
#: same LR size and metric: published weights against this project's own); DnCNN has its own figure
FIGURES = {"edsr_baseline_x2": ("frontier", "EDSR-baseline x2", "PSNR-Y loss (dB)", SR_REFERENCES),
           "srmd_x2": ("frontier", "SRMD x2 (published)", "PSNR-Y loss (dB)", SR_REFERENCES),
           "dncnn": ("frontier_dncnn", "DnCNN sigma 25, grey", "PSNR loss (dB)", ())}
#: the short model names that tell the lines of a shared figure apart
SHORT = {"edsr_baseline_x2": "EDSR", "srmd_x2": "SRMD", "dncnn": "DnCNN"}


def _figure_models(r: Results) -> dict[str, list[str]]:
    """Figure name -> the models drawn in it: those of :data:`FIGURES` with at least one measured point, in
    order."""
    out: dict[str, list[str]] = {}
    for model in dict.fromkeys(p.model for p in r.points if not p.failed and p.model in FIGURES):
        out.setdefault(FIGURES[model][0], []).append(model)
    return out


def _side(r: Results, model: str) -> int:
    return next((s["side"] for s in (QUICK if r.quick else FULL) if s["model"] == model), 0)


def _group(p: Point, shared: bool) -> str:
    runtime = "eager" if p.backend == "torch" else p.backend.split(" vs ")[0]
    return f"{SHORT.get(p.model, p.model) + ': ' if shared else ''}{p.approach} ({runtime})"


def figures(r: Results) -> dict[str, bytes]:
    """One figure per name of :data:`FIGURES`: a line per model, approach and back-end from the original at
    (1x, 0 dB), with the published marks where they are on the same task."""
    out = {}
    for name, names in _figure_models(r).items():
        shared = len(names) > 1
        pts = [{"group": _group(p, shared), "speedup": p.speedup, "loss": p.loss_db, "interval": p.interval,
                "label": f"{p.request:g}x"} for p in r.points if not p.failed and p.model in names]
        origin = [{"group": g, "speedup": 1.0, "loss": 0.0} for g in dict.fromkeys(p["group"] for p in pts)]
        stems = " and ".join(FIGURES[m][1] for m in names)
        sides = sorted({_side(r, m) for m in names})
        out[name] = frontier_figure(origin + pts, FIGURES[names[0]][3], loss_name=FIGURES[names[0]][2],
                                    title=f"{stems}, LR {'/'.join(f'{s}²' for s in sides)}, batch 1, 2 threads: "
                                          "measured frontier")
    return out


SECTION = Section("frontier", TITLE, measure, render, figures=figures)

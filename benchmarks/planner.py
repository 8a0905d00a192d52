"""BENCHMARKS.md section: the latency planner's requested vs measured end-to-end speed-ups.

For EDSR-baseline x2 and CIFAR ResNet-20/56 (batch 1, 2 threads, fp32) the planner is asked for
2x, 3x and 4x.  Every speed-up is measured end to end against the original model in its own
fastest form (min over contiguous / channels_last), interleaved in one process.  Next to each
plan: a uniform-ratio channel-SVD plan with the same total MACs, in its faster format.

Full mode: EDSR at 128x128 LR input (256x256 would not fit the 8-minute budget: see :data:`FULL`),
ResNets at 32x32; sized for at most ~8 minutes on the 2-core reference machine (layer timings
are cached across targets; identical layers are timed once).
Quick mode: tiny inputs, few repeats, 2x only (seconds); its numbers mean nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from convfactor import models
from convfactor.compression.api import capture_layer_io, relative_error
from convfactor.compression.surgery import candidate_layers
from convfactor.measure.latency import environment
from convfactor.methods import registry
from convfactor.rank import LatencyCache, LatencyConfig, plan
from convfactor.rank.criteria import clip_to_speed_bound
from convfactor.rank.latency import compare_models
from convfactor.spec.convspec import ConvSpec, UnsupportedLayer

from .markdown import heading, table
from .section import Section

TITLE = "Planner: requested vs measured end-to-end speed-up"

THREADS = 2


@dataclass(frozen=True)
class Config:
    """The cases, targets and timing settings of a run (:data:`FULL` or :data:`QUICK`)."""
    cases: tuple                  # (model name, input shape)
    targets: tuple                # requested speed-ups
    latency: dict                 # the planner's timing settings (fields of LatencyConfig)
    methods: tuple | None         # the methods the planner may use (None: its default)
    rounds: int                   # re-check: interleaved rounds and repeats
    repeats: int
    threads: int
    budget_s: float               # later cases are skipped, and listed, once this is spent


# EDSR at 128x128 LR, not 256x256: at 256x256 one forward takes ~0.5 s on the reference machine
# and the interleaved end-to-end checks alone (3 targets x up to 4 tries) exceed the 8-minute budget.
# ResNets first: they take about a minute together, so the time guard can only ever cut EDSR.
FULL = Config(cases=(("resnet20", (1, 3, 32, 32)), ("resnet56", (1, 3, 32, 32)), ("edsr_baseline_x2", (1, 3, 128, 128))),
              targets=(2.0, 3.0, 4.0), latency=dict(repeats=9, e2e_rounds=2, e2e_repeats=3, max_iter=4), methods=None,
              rounds=3, repeats=3, threads=THREADS, budget_s=420.0)
# 2 threads on a loaded 2-core box spin for ages; quick mode only smoke-tests
QUICK = Config(cases=(("resnet20", (1, 3, 16, 16)), ("edsr_baseline_x2", (1, 3, 12, 12))), targets=(2.0,),
               latency=dict(repeats=2, e2e_rounds=1, e2e_repeats=2, max_iter=2, ratios=(0.25, 0.5)),
               methods=("channel_svd",),
               rounds=1, repeats=2, threads=1, budget_s=60.0)


def _layer_macs(spec: ConvSpec, x: torch.Tensor) -> int:
    """Dense MACs of one layer run on its input ``x`` (a Linear runs on every row of ``x``)."""
    if spec.is_linear:
        return spec.dense_macs(()) * (x.numel() // max(1, x.shape[-1]))
    return spec.dense_macs(tuple(x.shape[2:])) * x.shape[0]


def _uniform_candidates(model: nn.Module, x: torch.Tensor, m) -> tuple[int, list]:
    """``(whole-model Conv/Linear MACs, [(spec, input size, batch)] of the convs ``m`` can factorize)``."""
    layers = candidate_layers(model)
    total, specs = 0, []
    for name, (inp, _) in capture_layer_io(model, layers, x).items():
        spec = ConvSpec.from_module(layers[name])
        total += _layer_macs(spec, inp)
        if spec.is_linear:
            continue
        try:
            m.check(spec)
        except UnsupportedLayer:
            continue
        specs.append((spec, tuple(inp.shape[2:]), inp.shape[0]))
    return total, specs


def _achieved(m, specs: list, total: int, t: float) -> float:
    """Whole-model MACs ratio when every layer of ``specs`` is at per-layer MACs ratio ``t``
    (ranks clipped to the speed bound, as the planner does)."""
    saved = 0
    for spec, size, batch in specs:
        try:
            ranks = clip_to_speed_bound(m, spec, m.ranks_for_macs(spec, t, size), size)
        except ValueError:
            continue
        if ranks is not None:
            saved += (spec.dense_macs(size) - m.cost(spec, ranks, size).macs) * batch
    return (total - saved) / total


def _uniform_for_macs(model, x, macs_ratio: float, method: str = "channel_svd"):
    """The plan with one per-layer MACs ratio t (channel SVD, speed bound applied as the planner
    does) whose whole-model MACs are closest to ``macs_ratio``: t by bisection."""
    m = registry.get(method)
    total, specs = _uniform_candidates(model, x, m)
    lo, hi, best = 0.01, 1.0, (abs(_achieved(m, specs, total, 1.0) - macs_ratio), 1.0)
    for _ in range(30):
        mid = (lo + hi) / 2
        r = _achieved(m, specs, total, mid)
        best = min(best, (abs(r - macs_ratio), mid))
        if r > macs_ratio:
            hi = mid
        else:
            lo = mid
    return plan(model, x, target={"macs": best[1]}, criterion="uniform", method=method,
                exclude=_linear_names(model))


def _linear_names(model):
    return [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]


def _rel_out_err(a, b, x) -> float:
    with torch.no_grad():
        return relative_error(b(x), a(x))


def measure_target(name: str, model: nn.Module, x: torch.Tensor, s: float, cache: LatencyCache, cfg: Config) -> dict:
    """Plan ``model`` for ``s``x, re-check the speed-up, and compare with the uniform plan of equal MACs."""
    t0 = time.perf_counter()
    p = plan(model, x, target={"speedup": s}, methods=cfg.methods, model_name=name,
             latency=LatencyConfig(threads=cfg.threads, cache=cache, **cfg.latency))
    planning_s = time.perf_counter() - t0
    compressed, _ = p.apply(model, x, allow_unreachable=True)    # a missed request is measured and reported
    uni = _uniform_for_macs(model, x, p.summary.macs_ratio)
    uni_model, _ = uni.apply(model, x)
    t = compare_models({"ref": (model, p.summary.reference_format), "plan": (compressed, p.memory_format),
                        "uni_c": (uni_model, "contiguous"), "uni_cl": (uni_model, "channels_last")},
                       x, threads=cfg.threads, rounds=cfg.rounds, repeats=cfg.repeats)
    return {"model": name, "input": "x".join(map(str, x.shape)), "requested": s,
            "planner": p.summary.measured_speedup, "recheck": t["ref"] / t["plan"],
            "format": p.memory_format, "macs": p.summary.macs_ratio,
            "err": _rel_out_err(model, compressed, x), "reachable": p.summary.reachable,
            "uniform": t["ref"] / min(t["uni_c"], t["uni_cl"]),
            "uni_fmt": "contiguous" if t["uni_c"] <= t["uni_cl"] else "channels_last",
            "uni_macs": uni.summary.macs_ratio, "uni_err": _rel_out_err(model, uni_model, x),
            "methods": ", ".join(sorted({L.method for L in p.compressed})) or "none (dense)",
            "plan_s": planning_s, "note": p.summary.message or ""}


@dataclass
class Results:
    quick: bool
    threads: int
    env: dict
    rows: list[dict] = field(default_factory=list)       # one per (model, target): see :func:`measure_target`
    skipped: list[str] = field(default_factory=list)     # "model Nx" cut by the time budget
    seconds: float = 0.0


def measure(quick: bool = False) -> Results:
    cfg = QUICK if quick else FULL
    # Timing sets the threads itself (measure_latency); the factorization math keeps the caller's setting.
    results = Results(quick, cfg.threads, environment(cfg.threads, batch=1, dtype="float32"))
    t_start = time.perf_counter()
    for name, shape in cfg.cases:
        model = models.get(name).eval()
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
        cache = LatencyCache()
        for s in cfg.targets:
            if time.perf_counter() - t_start > cfg.budget_s:
                results.skipped.append(f"{name} {s:.0f}x")
                continue
            results.rows.append(measure_target(name, model, x, s, cache, cfg))
    results.seconds = time.perf_counter() - t_start
    return results


def _cells(r: dict) -> list:
    within = abs(r["recheck"] / r["requested"] - 1) <= 0.10
    return [r["model"], r["input"], f"{r['requested']:.0f}x", f"{r['planner']:.2f}x", f"{r['recheck']:.2f}x",
            "yes" if within else "no", r["format"], f"{r['macs']:.3f}", f"{r['err']:.3f}",
            f"{r['uniform']:.2f}x ({r['uni_fmt']}, MACs {r['uni_macs']:.3f})", f"{r['uni_err']:.3f}", r["methods"],
            f"{r['plan_s']:.0f}"]


def render(results: Results) -> str:
    env = results.env
    lines = [*heading(TITLE),
             f"Batch 1, {results.threads} thread(s), fp32, {env['cpu']}, torch {env['torch']}"
             + (" — **quick mode: tiny inputs and few repeats, numbers are not meaningful**" if results.quick else "")
             + ".",
             "Speed-ups are end to end against the original model in its own fastest memory format, medians of "
             "interleaved runs in one process. *planner* is the planner's own verification; *re-check* is a fresh "
             "interleaved measurement after planning. *uniform* is channel SVD with one per-layer MACs ratio, "
             "matched to the plan's total MACs, in its faster format. Output error: relative L2 error of the "
             "model output on the example input, before fine-tuning (random-initialised weights for every model, "
             "the shipped EDSR's too: its trained kernels are compressed in the models section; random kernels "
             "have flat spectra, so these errors are pessimistic).", "",
             *table(["model", "input", "requested", "planner", "re-check", "within 10%", "format", "MACs kept",
                     "out. err", "uniform (same MACs)", "uniform err", "methods used", "planning s"],
                    map(_cells, results.rows))]
    notes = [f"- {r['model']} {r['requested']:.0f}x: {r['note']}" for r in results.rows if r["note"]]
    if notes:
        lines += ["", "Planner messages:", *notes]
    if results.skipped:
        lines += ["", f"Skipped to stay within the section's time budget: {', '.join(results.skipped)}."]
    lines += ["", f"Section run time: {results.seconds:.0f} s."]
    return "\n".join(lines) + "\n"


SECTION = Section("planner", TITLE, measure, render)

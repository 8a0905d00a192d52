"""Layer speed of every method at 2x, 4x and 8x fewer MACs, against the fastest dense conv.

For each shape the dense ``nn.Conv2d`` is timed in contiguous (NCHW) and channels_last layouts and
the faster one is the baseline.  Each factorized layer is timed in both layouts (and, for CP, in
both module forms) and its fastest variant is reported.  ``speed-up = t_dense_best / t_factorized``;
``efficiency = speed-up / MAC reduction`` where the MAC reduction is that of the ranks actually used
(ranks rounded to a multiple of 8 when ``round_to=8``, so the reduction can differ slightly from
the nominal 2x / 4x / 8x).  Batch 1, float32, ``torch.inference_mode``, threads set explicitly.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

from convfactor.measure.latency import burn_in, environment, measure_latency
from convfactor.methods import registry
from convfactor.spec.convspec import ConvSpec

from .markdown import heading, table
from .section import Section

TITLE = "Layer speed-ups of each method vs the fastest dense conv"

FULL_SHAPES = [(64, 64, 3, 128), (128, 128, 3, 64), (256, 256, 3, 28), (512, 512, 3, 14), (64, 64, 5, 64)]
QUICK_SHAPES = [(16, 16, 3, 16)]
METHODS = ["channel_svd", "spatial_svd", "tucker2", "cp", "depthwise"]
FORMATS = ("contiguous", "channels_last")
THREADS = 2
ROUND_TO = 8            # full mode: ranks rounded down to a multiple of 8


@dataclass
class Row:
    method: str
    shape: str
    nominal: float
    ranks: tuple
    mac_reduction: float
    dense_ms: float
    dense_format: str
    ms: float
    variant: str

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.ms

    @property
    def efficiency(self) -> float:
        return self.speedup / self.mac_reduction


@dataclass
class Results:
    rows: list[Row]
    env: dict
    ratios: tuple


def round_ranks(ranks: tuple, full: tuple, multiple: int) -> tuple:
    """Round each rank down to a multiple (at least ``multiple``, at most full)."""
    if multiple <= 1:
        return ranks
    return tuple(min(f, max(multiple, (r // multiple) * multiple)) for r, f in zip(ranks, full))


def _time(module: nn.Module, x: torch.Tensor, threads: int, quick: bool) -> dict[str, float]:
    kwargs = dict(threads=threads, repeats=3 if quick else 9, warmup=1 if quick else 5,
                  min_run_time=0.0 if quick else 0.15)
    return {fmt: measure_latency(module, x, memory_format=fmt, **kwargs).median_ms for fmt in FORMATS}


def variants(method_name: str, spec: ConvSpec, ranks: tuple) -> dict[str, nn.Module]:
    """The module forms to try for a method (random weights: timing does not depend on values)."""
    forms = {"": {}}
    if method_name == "cp":
        forms = {"separable": {"form": "separable"}, "folded": {"form": "folded"}}
    return {label: registry.get(method_name, **options).build(spec, ranks, None).eval()
            for label, options in forms.items()}


def measure_rows(shapes, ratios, methods, threads: int, quick: bool, round_to: int) -> list[Row]:
    rows = []
    torch.manual_seed(0)
    for cin, cout, k, hw in shapes:
        dense = nn.Conv2d(cin, cout, k, padding=k // 2, bias=True).eval()
        x = torch.randn(1, cin, hw, hw)
        spec = ConvSpec.from_module(dense)
        dense_t = _time(dense, x, threads, quick)
        dense_fmt = min(dense_t, key=dense_t.get)
        shape = f"{cin}->{cout} {k}x{k} @{hw}²"
        for name in methods:
            method = registry.get(name)
            for ratio in ratios:
                try:
                    ranks = method.ranks_for_macs(spec, 1.0 / ratio, (hw, hw))
                except ValueError:
                    continue
                ranks = round_ranks(ranks, method.full_rank(spec), round_to)
                reduction = spec.dense_macs((hw, hw)) / method.cost(spec, ranks, (hw, hw)).macs
                best = None
                for label, module in variants(name, spec, ranks).items():
                    for fmt, ms in _time(module, x, threads, quick).items():
                        if best is None or ms < best[0]:
                            best = (ms, f"{label + ', ' if label else ''}{fmt}")
                rows.append(Row(name, shape, ratio, ranks, reduction, dense_t[dense_fmt], dense_fmt, *best))
    return rows


def render(results: Results) -> str:
    rows, ratios = results.rows, results.ratios
    lines = [*heading(TITLE),
             f"Environment: {results.env}", "",
             "Speed-up = dense time (fastest of NCHW / channels_last) ÷ factorized time (fastest variant); "
             "efficiency = speed-up ÷ MAC reduction of the ranks used (1.0 = the theory delivered). "
             "MAC reductions are MACs, not time.", ""]
    lines += table(["method", "layer", "nominal", "ranks", "MAC reduction", "dense ms (layout)",
                    "factorized ms (variant)", "speed-up", "efficiency"],
                   ([r.method, r.shape, f"{r.nominal:g}x", ",".join(map(str, r.ranks)), f"{r.mac_reduction:.2f}x",
                     f"{r.dense_ms:.3f} ({r.dense_format})", f"{r.ms:.3f} ({r.variant})", f"{r.speedup:.2f}x",
                     f"{r.efficiency:.2f}"] for r in rows))
    lines += ["", "### Median efficiency per method (over shapes)", ""]
    lines += table(["method", *(f"{q:g}x" for q in ratios)],
                   ([m, *(_median_efficiency(rows, m, q) for q in ratios)] for m in dict.fromkeys(r.method for r in rows)))
    lines += ["", "### Best method per shape at 4x", ""]
    best = [max(c, key=lambda r: r.efficiency) for c in _by_shape(rows, nominal=4)]
    lines += table(["layer", "best method", "speed-up", "efficiency"],
                   ([b.shape, f"{b.method} ({b.variant})", f"{b.speedup:.2f}x", f"{b.efficiency:.2f}"] for b in best))
    return "\n".join(lines) + "\n"


def _median_efficiency(rows: list[Row], method: str, nominal: float) -> str:
    effs = [r.efficiency for r in rows if r.method == method and r.nominal == nominal]
    return f"{statistics.median(effs):.2f}" if effs else "-"


def _by_shape(rows: list[Row], nominal: float) -> list[list[Row]]:
    """The rows at ``nominal`` grouped by shape (shapes in order, those without such rows left out)."""
    groups = [[r for r in rows if r.shape == shape and r.nominal == nominal] for shape in dict.fromkeys(r.shape for r in rows)]
    return [g for g in groups if g]


def measure(quick: bool = False) -> Results:
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    ratios = (2, 4) if quick else (2, 4, 8)
    methods = [m for m in METHODS if m in registry.available()]
    env = environment(THREADS, batch=1, dtype="float32", round_ranks_to=ROUND_TO)
    burn_in(0.5 if quick else 3.0, THREADS)
    rows = measure_rows(shapes, ratios, methods, THREADS, quick, ROUND_TO if not quick else 1)
    return Results(rows, env, ratios)


SECTION = Section("layers", TITLE, measure, render)

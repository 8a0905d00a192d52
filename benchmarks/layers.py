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

from convfactor.spec.convspec import ConvSpec
from convfactor.measure.latency import burn_in, environment, measure_latency
from convfactor.methods import registry

TITLE = "Layer speed-ups of each method vs the fastest dense conv"

FULL_SHAPES = [(64, 64, 3, 128), (128, 128, 3, 64), (256, 256, 3, 28), (512, 512, 3, 14), (64, 64, 5, 64)]
QUICK_SHAPES = [(16, 16, 3, 16)]
METHODS = ["channel_svd", "spatial_svd", "tucker2", "cp", "depthwise"]
FORMATS = ("contiguous", "channels_last")


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
    method = registry.get(method_name)
    forms = {"": {}}
    if method_name == "cp":
        forms = {"separable": {"form": "separable"}, "folded": {"form": "folded"}}
    out = {}
    for label, options in forms.items():
        try:
            out[label] = method.build(spec, ranks, None, **options).eval()
        except TypeError:
            out[label] = method.build(spec, ranks, None).eval()
    return out


def measure(shapes, ratios, methods, threads: int, quick: bool, round_to: int) -> list[Row]:
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


def to_markdown(rows: list[Row], env: dict, ratios) -> str:
    lines = [f"## {TITLE}", "",
             f"Environment: {env}", "",
             "Speed-up = dense time (fastest of NCHW / channels_last) ÷ factorized time (fastest variant); "
             "efficiency = speed-up ÷ MAC reduction of the ranks used (1.0 = the theory delivered). "
             "MAC reductions are MACs, not time.", "",
             "| method | layer | nominal | ranks | MAC reduction | dense ms (layout) | factorized ms (variant) | speed-up | efficiency |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.shape} | {r.nominal:g}x | {','.join(map(str, r.ranks))} | {r.mac_reduction:.2f}x | "
                     f"{r.dense_ms:.3f} ({r.dense_format}) | {r.ms:.3f} ({r.variant}) | {r.speedup:.2f}x | {r.efficiency:.2f} |")
    lines += ["", "### Median efficiency per method (over shapes)", "",
              "| method | " + " | ".join(f"{q:g}x" for q in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for m in dict.fromkeys(r.method for r in rows):
        cells = []
        for q in ratios:
            effs = [r.efficiency for r in rows if r.method == m and r.nominal == q]
            cells.append(f"{statistics.median(effs):.2f}" if effs else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "### Best method per shape at 4x", "", "| layer | best method | speed-up | efficiency |", "|---|---|---|---|"]
    for shape in dict.fromkeys(r.shape for r in rows):
        cands = [r for r in rows if r.shape == shape and r.nominal == 4]
        if cands:
            b = max(cands, key=lambda r: r.efficiency)
            lines.append(f"| {shape} | {b.method} ({b.variant}) | {b.speedup:.2f}x | {b.efficiency:.2f} |")
    return "\n".join(lines) + "\n"


def run(quick: bool = False, threads: int = 2, round_to: int = 8) -> str:
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    ratios = (2, 4) if quick else (2, 4, 8)
    methods = [m for m in METHODS if m in registry.available()]
    env = environment(threads, batch=1, dtype="float32", round_ranks_to=round_to)
    burn_in(0.5 if quick else 3.0, threads)
    rows = measure(shapes, ratios, methods, threads, quick, round_to if not quick else 1)
    return to_markdown(rows, env, ratios)

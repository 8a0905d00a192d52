"""Low-rank + sparse (ADMM) vs pure low-rank (channel SVD) at equal MACs: quality and measured speed.

Quality: per-layer output relative error on held-out inputs, both fitted on the same calibration
inputs (response reconstruction: ``channel_svd`` with ``calibration=``, Zhang et al.'s closed form,
vs ``lowrank_sparse``, whose ADMM runs on the same response objective), for convs of
``edsr_baseline_x2`` and ``resnet20`` (shipped weights when present, else random init, labelled)
at the same MAC budget.  The inputs are the layers' real inputs on crops of the built-in photos.

Speed: batch 1, float32, threads set explicitly; the dense conv's fastest memory format is the
baseline, and each factorized form is timed in both formats and its fastest reported.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from convfactor import models
from convfactor.compression.api import factorize, relative_error
from convfactor.compression.calibration import collect_inputs
from convfactor.measure.latency import burn_in, environment, measure_latency
from convfactor.utils import torch_threads

from .data_aware import cifar_crops, crops
from .markdown import heading, table
from .section import Section

TITLE = "Low-rank + sparse vs pure low-rank at equal MACs"

FULL_SPEED_SHAPES = [(64, 64, 128), (128, 128, 64), (256, 256, 28)]
QUICK_SPEED_SHAPES = [(16, 16, 16)]
FORMATS = ("contiguous", "channels_last")
THREADS = 2


def _layer_inputs(quick: bool):
    """[(model label, layer name, layer, calibration inputs, held-out inputs)]."""
    out = []
    train = "test" if quick else "train"     # quick: the few small test photos only (other crops), for speed
    specs = [("resnet20", ["layer2.1.conv1", "layer3.1.conv1"])]
    if not quick:
        specs.insert(0, ("edsr_baseline_x2", ["body.3.body.0", "body.12.body.2"]))
    for name, layers in specs:
        pretrained = name in models.pretrained_names()
        torch.manual_seed(0)
        model = models.get(name, pretrained=pretrained).eval()
        label = f"{name} ({'shipped weights' if pretrained else 'random init'})"
        if name.startswith("edsr"):
            cal, test = crops(train, 2 if quick else 8, 48, 0, 2), crops("test", 2 if quick else 4, 48, 1, 2)
        else:
            cal, test = cifar_crops(train, 8 if quick else 64, 2), cifar_crops("test", 8 if quick else 32, 3)
        x_cal = collect_inputs(model, layers, [cal])
        x_test = collect_inputs(model, layers, [test], max_bytes=1 << 30)
        out += [(label, n, model.get_submodule(n), x_cal[n], x_test[n]) for n in layers]
    return out


def _fastest(module: nn.Module, x: torch.Tensor, threads: int, quick: bool) -> tuple[float, str]:
    """(median ms, memory format) of ``module``'s fastest memory format."""
    best = None
    for fmt in FORMATS:
        lat = measure_latency(copy.deepcopy(module), x, threads=threads, memory_format=fmt,
                              repeats=3 if quick else 9, warmup=1 if quick else 3, min_run_time=0.0 if quick else 0.15)
        if best is None or lat.median_ms < best[0]:
            best = (lat.median_ms, fmt)
    return best


@dataclass
class QualityRow:
    """Both data-aware fits of one layer at one MACs ratio, on its held-out inputs."""
    model: str
    layer: str
    ratio: float
    svd_ranks: tuple
    svd_error: float
    lrs_ranks: tuple                        # (rank, sparse channels)
    lrs_error: float


@dataclass
class SpeedRow:
    """One conv shape at one MACs ratio: median ms of each form's fastest memory format."""
    shape: str
    ratio: float
    dense_ms: float
    dense_format: str
    svd_ms: float
    lrs_ms: float


@torch.no_grad()
def measure_quality(quick: bool, ratios) -> list[QualityRow]:
    admm = dict(admm_iters=30 if quick else 300)
    rows = []
    with torch_threads(1 if quick else THREADS):
        for label, name, layer, x_cal, x_test in _layer_inputs(quick):
            size = tuple(x_test.shape[2:])
            ref = layer(x_test)
            for ratio in ratios:
                svd = factorize(layer, "channel_svd", macs_ratio=ratio, input_size=size, calibration=x_cal)
                lrs = factorize(layer, "lowrank_sparse", macs_ratio=ratio, input_size=size, calibration=x_cal, **admm)
                rows.append(QualityRow(label, name, ratio, svd.ranks, relative_error(svd(x_test), ref), lrs.ranks,
                                       relative_error(lrs(x_test), ref)))
    return rows


@torch.no_grad()
def measure_speed(quick: bool, ratios, threads: int) -> list[SpeedRow]:
    if not quick:
        burn_in(3.0, threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for c, n, hw in (QUICK_SPEED_SHAPES if quick else FULL_SPEED_SHAPES):
        dense = nn.Conv2d(c, n, 3, padding=1).eval()
        x = torch.randn(1, c, hw, hw, generator=gen)
        t_dense, fmt = _fastest(dense, x, threads, quick)
        for ratio in ratios:
            # random weights: only the shapes matter for speed (ADMM skipped: admm_iters=0 keeps the ranks)
            svd = factorize(dense, "channel_svd", macs_ratio=ratio, input_size=(hw, hw))
            lrs = factorize(dense, "lowrank_sparse", macs_ratio=ratio, input_size=(hw, hw), admm_iters=0)
            rows.append(SpeedRow(f"{c}->{n} @{hw}x{hw}", ratio, t_dense, fmt, _fastest(svd, x, threads, quick)[0],
                                 _fastest(lrs, x, threads, quick)[0]))
    return rows


@dataclass
class Results:
    threads: int                            # of the timings
    env: dict
    quality: list[QualityRow]
    speed: list[SpeedRow]


def measure(quick: bool = False) -> Results:
    ratios = (0.5,) if quick else (0.5, 0.3)
    threads = 1 if quick else THREADS        # a smoke run: one thread is steadier on a busy CPU
    quality = measure_quality(quick, ratios)
    return Results(threads, environment(threads), quality, measure_speed(quick, ratios, threads))


def render(results: Results) -> str:
    env = results.env
    lines = [*heading(TITLE),
             "### Quality (output relative error on held-out inputs; both fits data-aware, same MACs)", "",
             *table(["model", "layer", "MACs ratio", "low-rank ranks", "low-rank error", "LR+S ranks (rank, channels)",
                     "LR+S error", "LR+S / low-rank"],
                    ([r.model, r.layer, r.ratio, r.svd_ranks[0], f"{r.svd_error:.4f}", r.lrs_ranks, f"{r.lrs_error:.4f}",
                      f"{r.lrs_error / r.svd_error:.2f}"] for r in results.quality)),
             "", f"### Speed (batch 1, float32, {results.threads} threads; speed-up vs the fastest dense form)", "",
             *table(["shape", "MACs ratio", "dense ms (format)", "low-rank ms", "low-rank speed-up", "LR+S ms",
                     "LR+S speed-up"],
                    ([r.shape, r.ratio, f"{r.dense_ms:.3f} ({r.dense_format})", f"{r.svd_ms:.3f}",
                      f"{r.dense_ms / r.svd_ms:.2f}x", f"{r.lrs_ms:.3f}", f"{r.dense_ms / r.lrs_ms:.2f}x"]
                     for r in results.speed)),
             "", f"LR+S ranks from ``macs_ratio`` with ``sparse_fraction=0.25`` of the budget for the sparse "
             f"branch. Environment: {env['cpu']}, torch {env['torch']}."]
    return "\n".join(lines) + "\n"


SECTION = Section("lowrank_sparse", TITLE, measure, render)

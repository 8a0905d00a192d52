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

import torch
from torch import nn

from convfactor import models
from convfactor.compression.api import factorize, relative_error
from convfactor.compression.calibration import collect_inputs
from convfactor.measure.latency import burn_in, environment, measure_latency
from .data_aware import CIFAR_MEAN, CIFAR_STD, _crops

TITLE = "Low-rank + sparse vs pure low-rank at equal MACs"

FULL_SPEED_SHAPES = [(64, 64, 128), (128, 128, 64), (256, 256, 28)]
QUICK_SPEED_SHAPES = [(16, 16, 16)]
FORMATS = ("contiguous", "channels_last")


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
            cal, test = _crops(train, 2 if quick else 8, 48, 0, 2), _crops("test", 2 if quick else 4, 48, 1, 2)
        else:
            mean, std = torch.tensor(CIFAR_MEAN)[:, None, None], torch.tensor(CIFAR_STD)[:, None, None]
            cif = lambda t: (nn.functional.avg_pool2d(t, 2) - mean) / std
            cal, test = cif(_crops(train, 8 if quick else 64, 64, 2)), cif(_crops("test", 8 if quick else 32, 64, 3))
        x_cal = collect_inputs(model, layers, [cal])
        x_test = collect_inputs(model, layers, [test], max_bytes=1 << 30)
        out += [(label, n, model.get_submodule(n), x_cal[n], x_test[n]) for n in layers]
    return out


def _fastest(module: nn.Module, x: torch.Tensor, threads: int, quick: bool) -> tuple[float, str]:
    import copy
    best = None
    for fmt in FORMATS:
        lat = measure_latency(copy.deepcopy(module), x, threads=threads, memory_format=fmt,
                              repeats=3 if quick else 9, warmup=1 if quick else 3, min_run_time=0.0 if quick else 0.15)
        if best is None or lat.median_ms < best[0]:
            best = (lat.median_ms, fmt)
    return best


@torch.no_grad()
def run(quick: bool = False, threads: int = 2) -> str:
    ratios = (0.5,) if quick else (0.5, 0.3)
    admm = dict(admm_iters=30 if quick else 300)
    previous = torch.get_num_threads()
    torch.set_num_threads(1 if quick else threads)
    lines = [f"## {TITLE}", "",
             "### Quality (output relative error on held-out inputs; both fits data-aware, same MACs)", "",
             "| model | layer | MACs ratio | low-rank ranks | low-rank error | LR+S ranks (rank, channels) | "
             "LR+S error | LR+S / low-rank |", "|---|---|---|---|---|---|---|---|"]
    try:
        for label, name, layer, x_cal, x_test in _layer_inputs(quick):
            size = tuple(x_test.shape[2:])
            ref = layer(x_test)
            for ratio in ratios:
                svd = factorize(layer, "channel_svd", macs_ratio=ratio, input_size=size, calibration=x_cal)
                lrs = factorize(layer, "lowrank_sparse", macs_ratio=ratio, input_size=size, calibration=x_cal, **admm)
                e_svd, e_lrs = relative_error(svd(x_test), ref), relative_error(lrs(x_test), ref)
                lines.append(f"| {label} | {name} | {ratio} | {svd.ranks[0]} | {e_svd:.4f} | {lrs.ranks} | "
                             f"{e_lrs:.4f} | {e_lrs / e_svd:.2f} |")
    finally:
        torch.set_num_threads(previous)

    lines += ["", f"### Speed (batch 1, float32, {1 if quick else threads} threads; speed-up vs the fastest dense form)", "",
              "| shape | MACs ratio | dense ms (format) | low-rank ms | low-rank speed-up | LR+S ms | LR+S speed-up |",
              "|---|---|---|---|---|---|---|"]
    if quick:
        threads = 1          # a smoke run: one thread is steadier on a busy CPU
    else:
        burn_in(3.0, threads)
    gen = torch.Generator().manual_seed(0)
    for c, n, hw in (QUICK_SPEED_SHAPES if quick else FULL_SPEED_SHAPES):
        dense = nn.Conv2d(c, n, 3, padding=1).eval()
        x = torch.randn(1, c, hw, hw, generator=gen)
        t_dense, fmt = _fastest(dense, x, threads, quick)
        for ratio in ratios:
            # random weights: only the shapes matter for speed (ADMM skipped: admm_iters=0 keeps the ranks)
            svd = factorize(dense, "channel_svd", macs_ratio=ratio, input_size=(hw, hw))
            lrs = factorize(dense, "lowrank_sparse", macs_ratio=ratio, input_size=(hw, hw), admm_iters=0)
            t_svd, _ = _fastest(svd, x, threads, quick)
            t_lrs, _ = _fastest(lrs, x, threads, quick)
            lines.append(f"| {c}->{n} @{hw}x{hw} | {ratio} | {t_dense:.3f} ({fmt}) | {t_svd:.3f} | "
                         f"{t_dense / t_svd:.2f}x | {t_lrs:.3f} | {t_dense / t_lrs:.2f}x |")
    env = environment(threads)
    lines += ["", f"LR+S ranks from ``macs_ratio`` with ``sparse_fraction=0.25`` of the budget for the sparse "
              f"branch. Environment: {env['cpu']}, torch {env['torch']}."]
    return "\n".join(lines) + "\n"

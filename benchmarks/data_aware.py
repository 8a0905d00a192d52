"""Data-aware (response) fitting vs weight-only fitting at equal MACs, before any fine-tuning.

Models: ``edsr_baseline_x2`` (body convs) and ``resnet20`` (the residual-block convs), each with the
same rule and target for both fittings, so ranks and MACs are identical.  Calibration inputs are random
crops of the built-in *train* photos (LR crops for EDSR; 32x32 crops, CIFAR-normalized, for ResNet-20);
the errors are measured on crops of the built-in *test* photos, which the fit never saw.

Quality loss is the model output's relative error w.r.t. the uncompressed model (for EDSR also the
PSNR of the compressed output against the uncompressed output; for ResNet-20 the top-1 agreement with
the uncompressed model).  With shipped weights (``models.get(name, pretrained=True)``) the EDSR rows add
PSNR (Y channel, border 2 shaved) against the HR crops the LR test crops came from; without them the
models are random-init, and the table says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from convfactor import models
from convfactor.compression.api import compress, relative_error
from convfactor.data.images import builtin_images
from convfactor.data.sr import bicubic_downscale, bicubic_upscale
from convfactor.measure.quality import psnr
from convfactor.methods import registry
from convfactor.utils import torch_threads

from .markdown import heading, table
from .section import Section

TITLE = "Data-aware vs weight-only fitting (before fine-tuning)"

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CANDIDATE_METHODS = ["channel_svd", "spatial_svd", "tucker2", "basis", "depthwise", "cp"]
VARIANTS = ["weight-only", "data-aware", "data-aware + relu"]     # the last for SR only


def crops(split: str, n: int, size: int, seed: int, downscale: int = 1, with_hr: bool = False):
    """``n`` random crops (float in [0, 1]) of the built-in photos, ``size`` pixels after a bicubic downscale;
    with ``with_hr`` also the HR crops they came from."""
    rng = np.random.default_rng(seed)
    big = size * downscale
    images = [img for _, img in builtin_images(split) if min(img.shape[:2]) >= big]
    out = []
    for i in range(n):
        img = images[i % len(images)]
        y, x = rng.integers(img.shape[0] - big + 1), rng.integers(img.shape[1] - big + 1)
        out.append(torch.from_numpy(np.ascontiguousarray(img[y:y + big, x:x + big])).permute(2, 0, 1))
    hr = torch.stack(out).float() / 255
    lr = bicubic_downscale(hr, downscale).clamp(0, 1) if downscale > 1 else hr
    return (lr, hr) if with_hr else lr


def cifar_crops(split: str, n: int, seed: int) -> torch.Tensor:
    """``n`` 32x32 crops for the CIFAR models: 64 px crops average-pooled by 2, CIFAR-normalized."""
    mean, std = torch.tensor(CIFAR_MEAN)[:, None, None], torch.tensor(CIFAR_STD)[:, None, None]
    return (nn.functional.avg_pool2d(crops(split, n, 64, seed), 2) - mean) / std


def _model(name: str):
    if name in models.pretrained_names():
        return models.get(name, pretrained=True).eval(), True
    torch.manual_seed(0)
    return models.get(name).eval(), False


def _methods(quick: bool) -> list[str]:
    if quick:
        return ["channel_svd"]
    present = registry.available()
    return [name for name in CANDIDATE_METHODS if name in present]


def _psnr_vs(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (out.clamp(0, 1) - ref.clamp(0, 1)).pow(2).mean().item()
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


def _setups(quick: bool):
    """(model name, layer patterns, calibration, test input (or (LR, HR) for SR), task)."""
    n_cal, n_test = (2, 2) if quick else (16, 8)
    out = []
    if not quick:
        edsr_cal = crops("train", n_cal, 48, 0, downscale=2)
        edsr_test = crops("test", n_test, 64, 1, downscale=2, with_hr=True)
        out.append(("edsr_baseline_x2", ["body.*.body.0", "body.*.body.2"], edsr_cal, edsr_test, "sr"))
    res_cal = cifar_crops("test" if quick else "train", 8 if quick else 128, 2)   # quick: other test crops
    res_test = cifar_crops("test", 8 if quick else 128, 3)
    out.append(("resnet20", ["layer*.conv1", "layer*.conv2"], res_cal, res_test, "cls"))
    return out


def _rules(patterns, method, ratio, variant):
    relu_layer = patterns[0]          # EDSR: body.N.body.0 is followed by a ReLU (ResNet: BN comes first)
    rules = []
    for p in patterns:
        rule = {"op_names": [p], "op_types": ["Conv2d"], "method": method, "macs_ratio": ratio}
        if variant != "weight-only":        # each layer on the original's inputs (the sequential fit: esrgan section)
            rule.update(data_aware=True, sequential=False, relu=False)
        if variant == "data-aware + relu" and p == relu_layer:
            rule["relu"] = True
        rules.append(rule)
    return rules


@dataclass
class Fit:
    """One fitting of one model: its output error, or why it failed."""
    model: str                              # the model's label (with its weights)
    method: str
    variant: str
    ratio: float                            # the MACs ratio asked for
    macs_kept: float = 0.0                  # of the compressed layers
    error: float = 0.0                      # output relative error w.r.t. the uncompressed model
    loss_ratio: float | None = None         # data-aware error / weight-only error
    psnr_vs_uncompressed: float | None = None       # SR
    psnr_vs_hr: float | None = None                 # SR with shipped weights
    top1_agreement: float | None = None             # classification
    failed: str | None = None


@dataclass
class Reference:
    """The uncompressed SR model with shipped weights: PSNR against the HR crops, and bicubic's."""
    model: str
    psnr: float
    bicubic_psnr: float


@dataclass
class Case:
    """One (model, test input): what the fittings are compared with."""
    label: str
    model: nn.Module
    test: torch.Tensor
    ref: torch.Tensor                       # the uncompressed output on ``test``
    hr: torch.Tensor | None                 # the HR crops, with shipped SR weights
    cal: torch.Tensor                       # calibration inputs
    task: str                               # "sr" or "cls"


def _fit(case: Case, method: str, ratio: float, variant: str, patterns, base_err: float | None) -> Fit:
    """Compress ``case.model`` with one variant and measure its output on the held-out crops."""
    try:
        new, report = compress(case.model, _rules(patterns, method, ratio, variant), case.test[:1],
                               calibration=[case.cal] if variant != "weight-only" else None)
    except (ValueError, NotImplementedError) as exc:
        return Fit(case.label, method, variant, ratio, failed=str(exc)[:80])
    out = new(case.test)
    err = relative_error(out, case.ref)
    t = report.totals()
    fit = Fit(case.label, method, variant, ratio, t["macs_after"] / max(1, t["macs_before"]), err,
              None if variant == "weight-only" else err / base_err)
    if case.task == "sr":
        fit.psnr_vs_uncompressed = _psnr_vs(out, case.ref)
        fit.psnr_vs_hr = psnr(out, case.hr, scale=2) if case.hr is not None else None
    else:
        fit.top1_agreement = (out.argmax(1) == case.ref.argmax(1)).float().mean().item()
    return fit


def _fits(case: Case, patterns, quick: bool) -> list[Fit]:
    """channel_svd (the closed form) at every ratio with every variant; the others at the first ratio."""
    ratios = (0.5,) if quick else (0.5, 0.25)
    variants = VARIANTS if case.task == "sr" else VARIANTS[:2]
    fits = []
    for method in _methods(quick):
        for ratio in (ratios if method == "channel_svd" else ratios[:1]):
            base_err = None
            for variant in (variants if method == "channel_svd" else variants[:2]):
                fit = _fit(case, method, ratio, variant, patterns, base_err)
                fits.append(fit)
                if fit.failed:
                    break
                base_err = fit.error if variant == "weight-only" else base_err
    return fits


@dataclass
class Results:
    quick: bool
    threads: int
    rows: list[Fit | Reference] = field(default_factory=list)     # in table order


@torch.no_grad()
def measure(quick: bool = False) -> Results:
    """Nothing here is timed: 2 threads, and 1 in quick mode (faster on a busy CPU)."""
    with torch_threads(1 if quick else 2) as threads:
        results = Results(quick, threads)
        for name, patterns, cal, test, task in _setups(quick):
            model, pretrained = _model(name)
            test, hr = test if isinstance(test, tuple) else (test, None)
            ref = model(test)
            hr = hr if pretrained else None
            if hr is not None:
                results.rows.append(Reference(name, psnr(ref, hr, scale=2),
                                              psnr(bicubic_upscale(test.double(), 2), hr, scale=2)))
            label = f"{name} ({'shipped weights' if pretrained else 'random init, no shipped weights'})"
            results.rows += _fits(Case(label, model, test, ref, hr, cal, task), patterns, quick)
    return results


def _cells(fit: Fit | Reference) -> list:
    if isinstance(fit, Reference):
        return [f"{fit.model} (shipped weights)", "uncompressed", "1.000", "-", "0", "",
                f"PSNR vs HR {fit.psnr:.2f} dB (bicubic {fit.bicubic_psnr:.2f} dB)"]
    if fit.failed:
        return [fit.model, fit.method, fit.ratio, fit.variant, f"failed: {fit.failed}", "", ""]
    if fit.top1_agreement is not None:
        quality = f"top-1 agreement {100 * fit.top1_agreement:.1f}%"
    else:
        quality = f"PSNR vs uncompressed {fit.psnr_vs_uncompressed:.2f} dB" + (
            f"; vs HR {fit.psnr_vs_hr:.2f} dB" if fit.psnr_vs_hr is not None else "")
    ratio = "" if fit.loss_ratio is None else f"{fit.loss_ratio:.2f}"
    return [fit.model, fit.method, f"{fit.macs_kept:.3f}", fit.variant, f"{fit.error:.4f}", ratio, quality]


def render(results: Results) -> str:
    lines = [*heading(TITLE),
             "Equal ranks (so equal MACs) for both fittings; errors on held-out crops of the built-in test "
             "photos; calibration on crops of the built-in train photos. *Loss ratio* = data-aware output "
             "error / weight-only output error (goal: <= 0.5).", "",
             *table(["model (weights)", "method", "MACs kept (compressed layers)", "variant", "output rel. error",
                     "loss ratio", "quality"], map(_cells, results.rows))]
    lines += ["", f"{'Quick smoke run: tiny calibration set. ' if results.quick else ''}Threads: "
              f"{results.threads}; float32; calibration collected from the uncompressed model."]
    return "\n".join(lines) + "\n"


SECTION = Section("data_aware", TITLE, measure, render)

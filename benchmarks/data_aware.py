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

import numpy as np
import torch

from convfactor import models
from convfactor.compression.api import compress, relative_error
from convfactor.methods import registry

TITLE = "Data-aware vs weight-only fitting (before fine-tuning)"

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CANDIDATE_METHODS = ["channel_svd", "spatial_svd", "tucker2", "basis", "depthwise", "cp"]


def _crops(split: str, n: int, size: int, seed: int, downscale: int = 1, with_hr: bool = False):
    """``n`` random crops (float in [0, 1]) of the built-in photos, ``size`` pixels after a bicubic downscale;
    with ``with_hr`` also the HR crops they came from."""
    from convfactor.data.images import builtin_images
    from convfactor.data.sr import bicubic_downscale
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
        edsr_cal = _crops("train", n_cal, 48, 0, downscale=2)
        edsr_test = _crops("test", n_test, 64, 1, downscale=2, with_hr=True)
        out.append(("edsr_baseline_x2", ["body.*.body.0", "body.*.body.2"], edsr_cal, edsr_test, "sr"))
    mean, std = torch.tensor(CIFAR_MEAN)[:, None, None], torch.tensor(CIFAR_STD)[:, None, None]
    cif = lambda t: (torch.nn.functional.avg_pool2d(t, 2) - mean) / std
    res_cal = cif(_crops("test" if quick else "train", 8 if quick else 128, 64, 2))   # quick: other test crops
    res_test = cif(_crops("test", 8 if quick else 128, 64, 3))
    out.append(("resnet20", ["layer*.conv1", "layer*.conv2"], res_cal, res_test, "cls"))
    return out


def _rules(patterns, method, ratio, variant):
    relu_layer = patterns[0]          # EDSR: body.N.body.0 is followed by a ReLU (ResNet: BN comes first)
    rules = []
    for p in patterns:
        rule = {"op_names": [p], "op_types": ["Conv2d"], "method": method, "macs_ratio": ratio}
        if variant != "weight-only":
            rule["data_aware"] = True
        if variant == "data-aware + relu" and p == relu_layer:
            rule["relu"] = True
        rules.append(rule)
    return rules


@torch.no_grad()
def run(quick: bool = False, threads: int | None = None) -> str:
    """``threads``: default 2, and 1 in quick mode (nothing here is timed; one thread is faster on a busy CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or (1 if quick else 2))
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(previous)


def _run(quick: bool) -> str:
    ratios = (0.5,) if quick else (0.5, 0.25)
    lines = [f"## {TITLE}", "",
             "Equal ranks (so equal MACs) for both fittings; errors on held-out crops of the built-in test "
             "photos; calibration on crops of the built-in train photos. *Loss ratio* = data-aware output "
             "error / weight-only output error (goal: <= 0.5).", "",
             "| model (weights) | method | MACs kept (compressed layers) | variant | output rel. error | "
             "loss ratio | quality |", "|---|---|---|---|---|---|---|"]
    for name, patterns, cal, test, task in _setups(quick):
        model, pretrained = _model(name)
        test, hr = test if isinstance(test, tuple) else (test, None)
        ref = model(test)
        if pretrained and hr is not None:
            from convfactor.data.sr import bicubic_upscale
            from convfactor.measure.quality import psnr
            lines.append(f"| {name} (shipped weights) | uncompressed | 1.000 | - | 0 | | PSNR vs HR "
                         f"{psnr(ref, hr, scale=2):.2f} dB (bicubic {psnr(bicubic_upscale(test.double(), 2), hr, scale=2):.2f} dB) |")
        label = f"{name} ({'shipped weights' if pretrained else 'random init, no shipped weights'})"
        variants = ["weight-only", "data-aware"] + (["data-aware + relu"] if task == "sr" else [])
        for method in _methods(quick):
            # channel_svd (the closed form) at every ratio with every variant; the others at the first ratio
            for ratio in (ratios if method == "channel_svd" else ratios[:1]):
                base_err = None
                for variant in (variants if method == "channel_svd" else variants[:2]):
                    try:
                        new, report = compress(model, _rules(patterns, method, ratio, variant), test[:1],
                                               calibration=[cal] if variant != "weight-only" else None)
                    except (ValueError, NotImplementedError) as exc:
                        lines.append(f"| {label} | {method} | {ratio} | {variant} | failed: {str(exc)[:80]} | | |")
                        break
                    out = new(test)
                    err = relative_error(out, ref)
                    base_err = err if variant == "weight-only" else base_err
                    t = report.totals()
                    kept = t["macs_after"] / max(1, t["macs_before"])
                    if task == "sr":
                        quality = f"PSNR vs uncompressed {_psnr_vs(out, ref):.2f} dB"
                        if pretrained and hr is not None:
                            quality += f"; vs HR {psnr(out, hr, scale=2):.2f} dB"
                    else:
                        agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
                        quality = f"top-1 agreement {100 * agree:.1f}%"
                    ratio_txt = "" if variant == "weight-only" else f"{err / base_err:.2f}"
                    lines.append(f"| {label} | {method} | {kept:.3f} | {variant} | {err:.4f} | {ratio_txt} | "
                                 f"{quality} |")
    lines += ["", f"{'Quick smoke run: tiny calibration set. ' if quick else ''}Threads: "
              f"{torch.get_num_threads()}; float32; calibration collected from the uncompressed model."]
    return "\n".join(lines) + "\n"

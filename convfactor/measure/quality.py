"""Image quality and accuracy, following the BasicSR / EDSR evaluation conventions.

PSNR and SSIM (Wang et al. 2004) are computed on 8-bit-quantised images (float outputs are clipped to
[0, 1], scaled by 255 and rounded, as when saving a PNG), by default on the Y channel of ITU-R BT.601
(``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` on 0-255 values, kept in float), after shaving
``scale`` pixels off every border.  SSIM uses an 11x11 Gaussian window with sigma 1.5, C1 = (0.01 * 255)^2,
C2 = (0.03 * 255)^2, and averages the map over the *valid* region (no padding).  Batches and channels are
averaged per image / per channel, as BasicSR does.

This module is the one evaluation path: :func:`evaluate_sr`, :func:`evaluate_denoise` and
:func:`evaluate_classification` (or :func:`evaluate`) score a model on a data set, e.g. the held-out
built-in photos ``convfactor.data.images.builtin_images("test")``, next to the trivial baseline.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ..data.denoise import denoise_eval_images, eval_noisy
from ..data.sr import bicubic_upscale, sr_eval_pairs
from ..utils import eval_mode

__all__ = ["psnr", "ssim", "accuracy", "to_y", "quantize", "evaluate", "evaluate_sr", "evaluate_denoise",
           "evaluate_classification"]


# ---------------------------------------------------------------------------------------------- inputs
def quantize(img) -> torch.Tensor:
    """Any accepted image -> float64 tensor (B, C, H, W) of integer values 0..255.

    Accepted: float tensors in [0, 1] (C, H, W) or (B, C, H, W); uint8 tensors of the same layouts;
    uint8 numpy (H, W), (H, W, C) or (B, H, W, C); float numpy in [0, 1] with those layouts.
    """
    if torch.is_tensor(img):
        t = img.detach().cpu()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4:
            raise ValueError(f"expected a (C, H, W) or (B, C, H, W) tensor, got shape {tuple(img.shape)}")
        if t.dtype == torch.uint8:
            return t.to(torch.float64)
        return t.to(torch.float64).clamp(0, 1).mul(255).round()
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise ValueError(f"expected an (H, W[, C]) or (B, H, W, C) array, got shape {np.shape(img)}")
    t = torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)
    if a.dtype == np.uint8:
        return t.to(torch.float64)
    if np.issubdtype(a.dtype, np.floating):
        return t.to(torch.float64).clamp(0, 1).mul(255).round()
    raise ValueError(f"unsupported array dtype {a.dtype}; use uint8 or float in [0, 1]")


def to_y(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) 0-255 RGB -> (B, 1, H, W) BT.601 luma Y in [16, 235] (float, not rounded)."""
    coeffs = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return 16.0 + (x * coeffs).sum(1, keepdim=True) / 255.0


def _prepare(pred, target, scale: int, y_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = quantize(pred), quantize(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in shape: {tuple(p.shape)} vs {tuple(t.shape)} (as B, C, H, W)")
    if y_channel and p.shape[1] == 3:
        p, t = to_y(p), to_y(t)
    if scale < 0 or int(scale) != scale:
        raise ValueError(f"scale (the border to shave) must be a non-negative integer, got {scale}")
    if scale:
        s = int(scale)
        if p.shape[-1] <= 2 * s or p.shape[-2] <= 2 * s:
            raise ValueError(f"image {tuple(p.shape[-2:])} is too small to shave {s} pixels per border")
        p, t = p[..., s:-s, s:-s], t[..., s:-s, s:-s]
    return p, t


# ---------------------------------------------------------------------------------------------- metrics
def psnr(pred, target, *, scale: int = 0, y_channel: bool = True) -> float:
    """PSNR in dB (peak 255), averaged over the batch; ``inf`` for identical images.

    pred, target: tensors in [0, 1] ((3, H, W) or (B, 3, H, W); 1-channel too) or uint8 (H, W, 3) arrays.
    scale: pixels shaved off each border (the SR scale).  y_channel: on BT.601 Y (3-channel inputs only).
    """
    p, t = _prepare(pred, target, scale, y_channel)
    mse = (p - t).pow(2).flatten(1).mean(1)
    vals = [math.inf if m == 0 else 10.0 * math.log10(255.0 ** 2 / float(m)) for m in mse]
    return float(sum(vals) / len(vals))


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(pred, target, *, scale: int = 0, y_channel: bool = True) -> float:
    """SSIM (Wang et al. 2004, eq. 13), Gaussian 11x11 window, sigma 1.5, data range 255, valid region only.

    Same inputs and conventions as :func:`psnr`; multi-channel images average the per-channel SSIM.
    """
    p, t = _prepare(pred, target, scale, y_channel)
    b, c, h, w = p.shape
    if h < 11 or w < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 after shaving, got {h}x{w}")
    g = _gaussian_window()
    gv, gh = g.view(1, 1, 11, 1), g.view(1, 1, 1, 11)

    def blur(x):  # separable valid filtering, each channel on its own
        x = x.reshape(b * c, 1, *x.shape[-2:])
        return F.conv2d(F.conv2d(x, gv), gh)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_p, mu_t = blur(p), blur(t)
    var_p = blur(p * p) - mu_p ** 2
    var_t = blur(t * t) - mu_t ** 2
    cov = blur(p * t) - mu_p * mu_t
    smap = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))
    return float(smap.reshape(b, -1).mean(1).mean())


def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: Iterable[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent: ``{"top1": .., "top5": ..}``; k larger than the class count counts as all."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, classes) and labels (N,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("accuracy of an empty batch")
    topk = tuple(topk)
    kmax = min(max(topk), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels.view(-1, 1)
    return {f"top{k}": float(hit[:, : min(k, kmax)].any(1).double().mean() * 100) for k in topk}


# ---------------------------------------------------------------------------------------------- evaluation
def _model_device_dtype(model: nn.Module):
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _scores(pred, target, prefix: str = "", **options) -> dict[str, float]:
    """``{prefix + "psnr": .., prefix + "ssim": ..}`` of ``pred`` against ``target``."""
    return {prefix + "psnr": psnr(pred, target, **options), prefix + "ssim": ssim(pred, target, **options)}


def _summary(rows: list[dict], baseline: str | None) -> dict:
    """Means over the per-image rows of PSNR/SSIM (and the baseline's), plus the rows themselves."""
    keys = ["psnr", "ssim"] + ([f"{baseline}_psnr", f"{baseline}_ssim"] if baseline else [])
    return {**{k: float(np.mean([r[k] for r in rows])) for k in keys}, "images": rows}


@torch.no_grad()
def evaluate_sr(model: nn.Module, data, scale: int, *, y_channel: bool = True, baseline: bool = True,
                progress: bool = False) -> dict:
    """PSNR/SSIM of ``model`` (LR in [0, 1] -> SR) on full images, shave = scale; also the bicubic baseline.

    data: ``[(name, hr uint8)]`` (e.g. ``builtin_images("test")``), ``[(name, lr, hr)]`` or an SRFolder.
    Returns ``{"psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "images": [per-image rows]}``.
    """
    device, dtype = _model_device_dtype(model)
    metric = {"scale": scale, "y_channel": y_channel}
    rows = []
    with eval_mode(model):
        for name, lr, hr in _progress(sr_eval_pairs(data, scale), progress, "evaluate"):
            out = model(lr[None].to(device, dtype)).float().cpu()
            if out.shape[-2:] != hr.shape[-2:]:
                raise ValueError(f"model output {tuple(out.shape[-2:])} != HR {tuple(hr.shape[-2:])} for {name}; "
                                 f"is scale={scale} right?")
            row = {"name": name, **_scores(out, hr, **metric)}
            if baseline:
                row.update(_scores(bicubic_upscale(lr.double(), scale), hr, "bicubic_", **metric))
            rows.append(row)
    return _summary(rows, "bicubic" if baseline else None)


@torch.no_grad()
def evaluate_denoise(model: nn.Module, data, sigma: float, *, grey: bool = True, seed: int = 0,
                     baseline: bool = True, progress: bool = False) -> dict:
    """PSNR/SSIM of ``model`` (noisy -> clean) with Gaussian noise ``sigma`` (0-255 scale), fixed seed.

    data: ``[(name, uint8 image)]``.  Each image's noise is :func:`convfactor.data.denoise.eval_noisy`
    (seeded by its name and ``seed``), so every model sees the same noise.  Metrics on all channels
    (grey: the one channel).  The baseline is the noisy input itself (quantised, hence clipped to
    [0, 255]).  Returns ``{"psnr", "ssim", "noisy_psnr", "noisy_ssim", "images": [per-image rows]}``.
    """
    device, dtype = _model_device_dtype(model)
    rows = []
    with eval_mode(model):
        for name, clean in _progress(denoise_eval_images(data, grey), progress, "evaluate"):
            noisy = eval_noisy(name, clean, sigma, seed)
            out = model(noisy[None].to(device, dtype)).float().cpu()
            row = {"name": name, **_scores(out, clean, y_channel=False)}
            if baseline:
                row.update(_scores(noisy, clean, "noisy_", y_channel=False))
            rows.append(row)
    return _summary(rows, "noisy" if baseline else None)


@torch.no_grad()
def evaluate_classification(model: nn.Module, data, *, batch_size: int = 256, topk=(1, 5),
                            progress: bool = False) -> dict:
    """Top-k accuracy (percent) of ``model`` over a Dataset of (image, label) or a DataLoader."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=False) if isinstance(data, Dataset) else data
    device, dtype = _model_device_dtype(model)
    hits = {k: 0.0 for k in topk}
    n = 0
    with eval_mode(model):
        for x, y in _progress(loader, progress, "evaluate"):
            acc = accuracy(model(x.to(device, dtype)).float().cpu(), torch.as_tensor(y), topk)
            for k in topk:
                hits[k] += acc[f"top{k}"] * len(y) / 100.0
            n += len(y)
    if n == 0:
        raise ValueError("the classification data set is empty")
    return {**{f"top{k}": 100.0 * hits[k] / n for k in topk}, "n": n}


def evaluate(model: nn.Module, task: str, data, **options) -> dict:
    """Dispatch on ``task``: ``"sr"`` (needs ``scale``), ``"denoise"`` (needs ``sigma``) or ``"classification"``."""
    if task == "sr":
        if "scale" not in options:
            raise ValueError("evaluate(task='sr') needs scale=")
        return evaluate_sr(model, data, **options)
    if task == "denoise":
        if "sigma" not in options:
            raise ValueError("evaluate(task='denoise') needs sigma=")
        return evaluate_denoise(model, data, **options)
    if task == "classification":
        return evaluate_classification(model, data, **options)
    raise ValueError(f"unknown task {task!r}; use 'sr', 'denoise' or 'classification'")


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, leave=False)

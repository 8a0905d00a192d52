"""Quality of an SR or denoising model on the held-out built-in photos, next to its trivial baseline.

SR: PSNR-Y / SSIM-Y (BT.601, shave = scale, 8-bit outputs) of the model and of bicubic upscaling
(MATLAB convention, :func:`convfactor.data.sr.bicubic_upscale`) of the same LR images.
Denoising: PSNR / SSIM of the model output and of the noisy input (Gaussian noise of ``sigma`` on the
0-255 scale, seeded per image so every model sees the same noise).
"""
from __future__ import annotations

import statistics
import zlib

import torch
from torch import nn

__all__ = ["heldout_quality", "test_images"]


def _center_crop(img, max_side: int | None):
    """Centre-crop an (H, W, C) uint8 image to at most ``max_side`` (an even size) per side."""
    if not max_side:
        return img
    h, w = img.shape[:2]
    ch, cw = min(h, max_side) // 2 * 2, min(w, max_side) // 2 * 2
    y, x = (h - ch) // 2, (w - cw) // 2
    return img[y:y + ch, x:x + cw]


def test_images(max_side: int | None = None, limit: int | None = None):
    """The held-out built-in photos ``[(name, uint8 (H, W, 3))]``, optionally centre-cropped / fewer."""
    from ..data.images import builtin_images
    images = [(n, _center_crop(a, max_side)) for n, a in builtin_images("test")]
    return images[:limit] if limit else images


@torch.no_grad()
def heldout_quality(model: nn.Module, task: str, *, scale: int | None = None, sigma: float | None = None,
                    max_side: int | None = None, limit: int | None = None, images=None,
                    progress: bool = False) -> dict:
    """Per-image and mean quality of ``model`` and of the baseline on the held-out photos.

    ``task``: ``"sr"`` (needs ``scale``) or ``"denoise"`` (needs ``sigma``; grey if the model takes
    one channel).  ``max_side``/``limit`` crop/shorten the set for quick runs (the shipped figures
    use the full images).  Returns ``{"images": {name: {...}}, "mean": {...}, "baseline": str}``.
    """
    from ..measure.quality import psnr, ssim
    model = model.eval()
    images = images if images is not None else test_images(max_side, limit)
    rows: dict[str, dict] = {}

    def progress_bar(items):
        if not progress:
            return items
        from tqdm.auto import tqdm
        return tqdm(list(items), desc=f"evaluating ({task})", unit="image")
    if task == "sr":
        if not scale:
            raise ValueError("task 'sr' needs scale=")
        from ..data.sr import bicubic_upscale, sr_eval_pairs
        for name, lr, hr in progress_bar(sr_eval_pairs(images, scale)):
            out = model(lr[None]).clamp(0, 1)[0]
            base = bicubic_upscale(lr, scale).clamp(0, 1)
            rows[name] = {"psnr_y": psnr(out, hr, scale=scale), "ssim_y": ssim(out, hr, scale=scale),
                          "baseline_psnr_y": psnr(base, hr, scale=scale),
                          "baseline_ssim_y": ssim(base, hr, scale=scale)}
        baseline = "bicubic"
    elif task == "denoise":
        if sigma is None:
            raise ValueError("task 'denoise' needs sigma=")
        from ..data.denoise import add_noise, denoise_eval_images
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        grey = first.in_channels == 1
        for name, clean in progress_bar(denoise_eval_images(images, grey=grey)):
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            noisy = add_noise(clean, sigma, g)
            out = model(noisy[None]).clamp(0, 1)[0]
            kw = {"scale": 0, "y_channel": False}
            rows[name] = {"psnr": psnr(out, clean, **kw), "ssim": ssim(out, clean, **kw),
                          "baseline_psnr": psnr(noisy.clamp(0, 1), clean, **kw),
                          "baseline_ssim": ssim(noisy.clamp(0, 1), clean, **kw)}
        baseline = "noisy input"
    else:
        raise ValueError(f"task must be 'sr' or 'denoise', got {task!r}")
    keys = next(iter(rows.values())).keys()
    mean = {k: float(statistics.fmean(float(r[k]) for r in rows.values())) for k in keys}
    rows = {n: {k: float(v) for k, v in r.items()} for n, r in rows.items()}
    return {"images": rows, "mean": mean, "baseline": baseline, "n_images": len(rows),
            "max_side": max_side}

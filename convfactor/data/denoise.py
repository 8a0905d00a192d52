"""Gaussian denoising data (the DnCNN setting, Zhang et al. 2017 sec. IV-A).

Clean images are uint8 -> [0, 1]; the noisy input is ``clean + N(0, (sigma/255)^2)`` with sigma on the
0-255 scale and *no clipping* (as in DnCNN's training and test sets).  Grey images use the BT.601 luma
``0.299 R + 0.587 G + 0.114 B`` rounded to uint8.  An evaluation image's noise is seeded by its name
(:func:`eval_noisy`), so every model, run and command sees the same noisy input.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from .sr import SeededPatches, augment, to_tensor

__all__ = ["to_grey", "add_noise", "eval_noisy", "DenoisePatchDataset", "denoise_eval_images"]


def to_grey(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H, W) BT.601 luma; (H, W) passes through."""
    a = np.asarray(img)
    if a.ndim == 2:
        return a
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected (H, W) or (H, W, 3), got {a.shape}")
    y = a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def add_noise(img: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``img + N(0, (sigma/255)^2)``: img float in [0, 1] (any shape), sigma on the 0-255 scale; not clipped."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    device = img.device if generator is None else generator.device
    noise = torch.randn(img.shape, generator=generator, dtype=img.dtype, device=device).to(img.device)
    return img + noise * (float(sigma) / 255.0)


def eval_noisy(name: str, clean: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """The fixed noisy copy of the evaluation image ``name``: :func:`add_noise` with a generator seeded
    by ``crc32(name) + seed``.  clean: float (C, H, W) in [0, 1]; same shape and dtype out."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) + int(seed))
    return add_noise(clean, sigma, generator)


def _prepare(images, grey: bool) -> list[tuple[str, np.ndarray]]:
    out = []
    for k, item in enumerate(images):
        name, img = (item if isinstance(item, (tuple, list)) else (f"image{k}", item))
        img = np.asarray(img)
        if img.dtype != np.uint8:
            raise ValueError(f"{name}: expected a uint8 image, got {img.dtype}")
        img = to_grey(img) if grey else (img if img.ndim == 3 else np.repeat(img[:, :, None], 3, 2))
        out.append((name, img[:, :, None] if img.ndim == 2 else img))
    if not out:
        raise ValueError("no images given")
    return out


class DenoisePatchDataset(SeededPatches):
    """Random patches: item i -> (noisy, clean), each (C, p, p) float32, C = 1 (grey) or 3.

    images: ``[(name, uint8 image)]`` or arrays.  ``sigma``: a number, or ``(lo, hi)`` for blind training
    (sigma drawn uniformly per patch).  Item i depends only on ``(seed, i)`` (patch, flip/rotation, noise).
    """

    def __init__(self, images, sigma, patch_size: int = 40, length: int = 1000, grey: bool = True, seed: int = 0,
                 augment: bool = True):
        lo, hi = (sigma, sigma) if np.isscalar(sigma) else tuple(sigma)
        if lo < 0 or hi < lo:
            raise ValueError(f"sigma must be >= 0 (or a range lo <= hi), got {sigma}")
        super().__init__(patch_size, length, seed)
        self.sigma, self.grey, self.augment = (float(lo), float(hi)), grey, augment
        self.images = [(n, a) for n, a in _prepare(images, grey) if min(a.shape[:2]) >= patch_size]
        if not self.images:
            raise ValueError(f"no image has a side >= patch_size {patch_size}")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng, (_, img), y, x = self._window(i, self.images)
        p = self.patch_size
        patch = img[y: y + p, x: x + p]
        if self.augment:
            (patch,) = augment((patch,), rng)
        clean = to_tensor(patch)
        sigma = self.sigma[0] if self.sigma[0] == self.sigma[1] else float(rng.uniform(*self.sigma))
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        return add_noise(clean, sigma, g), clean


def denoise_eval_images(images, grey: bool = True) -> list[tuple[str, torch.Tensor]]:
    """Clean full images for evaluation: ``[(name, (C, H, W) float in [0, 1])]``."""
    return [(n, to_tensor(a)) for n, a in _prepare(images, grey)]

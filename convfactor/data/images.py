"""The built-in image set: the photographs bundled with scikit-image that load with no network.

Fixed split (by name, never random):

- ``test`` (held out; used for every quality figure): astronaut, camera, chelsea, coffee, coins.
- ``train``: rocket, immunohistochemistry, hubble_deep_field, retina, colorwheel, logo, brick, grass,
  gravel, clock, page, text, moon, cell, microaneurysms, horse.

``eagle`` is left out (it needs a download).  Every image is returned as uint8 H x W x 3: grey images are
repeated to three channels, ``logo`` (RGBA) is composited over white, ``horse`` (boolean) becomes 0/255.
"""
from __future__ import annotations

import functools

import numpy as np

from ..utils import UnknownName

__all__ = ["TRAIN", "TEST", "builtin_images", "load_builtin", "to_rgb", "center_crop"]

TEST: tuple[str, ...] = ("astronaut", "camera", "chelsea", "coffee", "coins")
TRAIN: tuple[str, ...] = ("rocket", "immunohistochemistry", "hubble_deep_field", "retina", "colorwheel", "logo",
                          "brick", "grass", "gravel", "clock", "page", "text", "moon", "cell", "microaneurysms",
                          "horse")


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Any scikit-image sample -> uint8 (H, W, 3): bool -> 0/255, grey -> 3 channels, RGBA over white."""
    a = np.asarray(img)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or bool image, got {a.dtype}")
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 4:
        alpha = a[:, :, 3:].astype(np.float64) / 255.0
        rgb = a[:, :, :3].astype(np.float64) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 3:
        return a
    raise ValueError(f"cannot make an RGB image from shape {a.shape}")


@functools.lru_cache(maxsize=None)
def load_builtin(name: str) -> np.ndarray:
    """One built-in image as read-only uint8 (H, W, 3)."""
    if name not in TRAIN + TEST:
        raise UnknownName(f"{name!r} is not a built-in image; known: {', '.join(sorted(TRAIN + TEST))}")
    from skimage import data
    try:
        img = to_rgb(getattr(data, name)())
    except Exception as exc:  # a broken scikit-image install
        raise RuntimeError(f"scikit-image could not load its bundled image {name!r}: {exc}") from exc
    img = np.ascontiguousarray(img)
    img.setflags(write=False)
    return img


def center_crop(img: np.ndarray, max_side: int | None) -> np.ndarray:
    """Centre-crop an (H, W, C) image to at most ``max_side`` pixels per side, each side even
    (so every SR scale-2 crop aligns); ``None`` or 0 returns ``img`` itself."""
    if not max_side:
        return img
    h, w = img.shape[:2]
    ch, cw = min(h, max_side) // 2 * 2, min(w, max_side) // 2 * 2
    y, x = (h - ch) // 2, (w - cw) // 2
    return img[y:y + ch, x:x + cw]


def builtin_images(split: str = "train", *, max_side: int | None = None,
                   limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    """``[(name, uint8 (H, W, 3))]`` for ``split`` in ``"train"``, ``"test"`` (the held-out photos of
    every quality figure) or ``"all"``, in a fixed order.

    Quick runs shrink the set: ``max_side`` centre-crops each photo (:func:`center_crop`) and
    ``limit`` keeps the first ``limit`` photos; the shipped figures use neither.
    """
    names = {"train": TRAIN, "test": TEST, "all": TRAIN + TEST}.get(split)
    if names is None:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    names = names[:limit] if limit else names
    return [(n, center_crop(load_builtin(n), max_side)) for n in names]

"""Super-resolution data: bicubic degradation, random training patches, and folders of benchmark images.

Resize convention (the one EDSR, RCAN and BasicSR use to build DIV2K/Set5 LR images): MATLAB's
``imresize(img, 1/scale, 'bicubic')``, i.e. the Keys cubic kernel with a = -0.5, widened by the scale when
downscaling (antialiasing), symmetric (mirror) boundary handling, pixel centres aligned as
``u = x/scale + 0.5 * (1 - 1/scale)``.  The HR image is first cropped to a multiple of the scale
(bottom/right rows and columns dropped) so LR and HR align exactly.  Computed in float64 and rounded to
uint8 once at the end (MATLAB rounds after each axis: at most one grey level apart).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["calibration_crops", "imresize", "mod_crop", "bicubic_downscale", "bicubic_upscale", "to_tensor", "to_uint8",
           "read_image", "SRPatchDataset", "SRFolder", "sr_eval_pairs", "IMAGE_EXTENSIONS", "SeededPatches", "augment"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".webp")


# ---------------------------------------------------------------------------------------------- resizing
def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys (1981) cubic convolution kernel with a = -0.5 (MATLAB ``cubic``)."""
    ax = np.abs(x)
    ax2, ax3 = ax ** 2, ax ** 3
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


@functools.lru_cache(maxsize=64)
def _resize_matrix(in_len: int, out_len: int, scale: float, antialias: bool = True) -> np.ndarray:
    """(out_len, in_len) float64 matrix of MATLAB imresize's ``contributions`` for one axis."""
    width = 4.0
    if scale < 1 and antialias:
        width /= scale
        kernel = lambda t: scale * _cubic(scale * t)  # noqa: E731
    else:
        kernel = _cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)          # 1-based output coordinates
    u = x / scale + 0.5 * (1 - 1 / scale)                     # matching 1-based input coordinate
    left = np.floor(u - width / 2)
    taps = int(np.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]            # 1-based input indices
    w = kernel(u[:, None] - idx)
    w /= w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    idx0 = mirror[np.mod(idx - 1, 2 * in_len).astype(np.int64)]
    m = np.zeros((out_len, in_len))
    np.add.at(m, (np.repeat(np.arange(out_len), taps), idx0.ravel()), w.ravel())
    return m


def imresize(img, scale: float | None = None, size: tuple[int, int] | None = None, antialias: bool = True):
    """MATLAB-style bicubic resize.

    img: uint8/float numpy (H, W) or (H, W, C), or a float tensor (..., H, W).  Give ``scale`` (output =
    ceil(scale * input)) or ``size`` = (H_out, W_out).  uint8 in -> uint8 out (rounded, clipped); float in ->
    float out (no clipping).
    """
    is_tensor = torch.is_tensor(img)
    h, w = (img.shape[-2], img.shape[-1]) if is_tensor else (img.shape[0], img.shape[1])
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale and size")
    if size is None:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        size = (int(np.ceil(h * scale)), int(np.ceil(w * scale)))
        sh = sw = float(scale)
    else:
        sh, sw = size[0] / h, size[1] / w
    mh = _resize_matrix(h, int(size[0]), sh, antialias)
    mw = _resize_matrix(w, int(size[1]), sw, antialias)
    if is_tensor:
        x = img.to(torch.float64)
        out = torch.from_numpy(mh).to(x.device) @ x @ torch.from_numpy(mw.T).to(x.device)
        if img.dtype == torch.uint8:
            return out.round().clamp(0, 255).to(torch.uint8)
        return out.to(img.dtype)
    a = np.asarray(img)
    x = a.astype(np.float64)
    out = np.einsum("ij,jk...->ik...", mh, x)
    out = np.einsum("ij,kj...->ki...", mw, out)
    if a.dtype == np.uint8:
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out.astype(a.dtype if np.issubdtype(a.dtype, np.floating) else np.float64)


def mod_crop(img, scale: int):
    """Crop the bottom/right so H and W are multiples of ``scale`` (numpy (H, W, ...) or tensor (..., H, W))."""
    if torch.is_tensor(img):
        h, w = img.shape[-2:]
        return img[..., : h - h % scale, : w - w % scale]
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def bicubic_downscale(hr, scale: int):
    """LR image of ``hr``: mod-crop to a multiple of ``scale``, then MATLAB bicubic by 1/scale (antialiased).

    hr: uint8 (H, W, 3) numpy (-> uint8), or a float tensor (C, H, W) / (B, C, H, W) (-> float, unclipped).
    """
    scale = _check_scale(scale)
    hr = mod_crop(hr, scale)
    h, w = (hr.shape[-2:] if torch.is_tensor(hr) else hr.shape[:2])
    if h == 0 or w == 0:
        raise ValueError(f"image is smaller than the scale {scale}")
    return imresize(hr, size=(h // scale, w // scale))


def bicubic_upscale(lr, scale: int):
    """The bicubic baseline: MATLAB bicubic upscaling of ``lr`` by ``scale`` (same types as :func:`imresize`)."""
    scale = _check_scale(scale)
    h, w = (lr.shape[-2:] if torch.is_tensor(lr) else lr.shape[:2])
    return imresize(lr, size=(h * scale, w * scale))


def _check_scale(scale) -> int:
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return int(scale)


# ---------------------------------------------------------------------------------------------- conversions
def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) -> float32 (C, H, W) in [0, 1]."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(np.array(a.transpose(2, 0, 1), copy=True)).float().div_(255.0)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """float (C, H, W) in [0, 1] -> uint8 (H, W, C) (rounded, clipped)."""
    return t.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def read_image(path) -> np.ndarray:
    """An image file as uint8 (H, W, 3) (grey and palette images converted to RGB)."""
    from PIL import Image
    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------------------------- folders
_LAYOUTS = ("benchmark", "div2k", "basicsr", "srf", "flat")


class SRFolder(Dataset):
    """Full-image (lr, hr) pairs from a folder; item i -> (lr (3, h, w), hr (3, s*h, s*w)) float in [0, 1].

    Layouts (``layout="auto"`` picks the first that matches ``root``):

    - ``benchmark`` (EDSR's Set5/Set14/B100/Urban100): ``root/HR/NAME.png``, ``root/LR_bicubic/X{s}/NAMEx{s}.png``;
    - ``div2k``: ``root/DIV2K_{split}_HR/0001.png``, ``root/DIV2K_{split}_LR_bicubic/X{s}/0001x{s}.png``
      (``split`` "train" or "valid"; default: train if present, else valid);
    - ``basicsr``: ``root/GTmod12/NAME.png``, ``root/LRbicx{s}/NAME.png``;
    - ``srf`` (Huang et al.'s release): ``root/image_SRF_{s}/NAME_HR.png`` and ``NAME_LR.png``;
    - ``flat``: ``root/*.png`` are HR images.

    HR is mod-cropped to a multiple of ``scale``.  When the layout's LR folder is absent, LR is the bicubic
    downscale of HR (:func:`bicubic_downscale`); when it is present every HR image must have its LR file of
    exactly 1/scale the size, otherwise loading fails naming the file.
    """

    def __init__(self, root, scale: int, layout: str = "auto", split: str | None = None):
        self.root = Path(root)
        self.scale = _check_scale(scale)
        if not self.root.is_dir():
            raise FileNotFoundError(f"SR data folder {self.root} does not exist")
        if split is None:  # DIV2K: the training set if present, else the validation set
            split = "train" if (self.root / "DIV2K_train_HR").is_dir() or \
                not (self.root / "DIV2K_valid_HR").is_dir() else "valid"
        if layout == "auto":
            layout = self._detect(split)
        if layout not in _LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(_LAYOUTS)} or 'auto'")
        self.layout = layout
        self.hr_files, self.lr_files = self._find(layout, split)
        if not self.hr_files:
            raise FileNotFoundError(f"no HR images ({'/'.join(IMAGE_EXTENSIONS)}) found for layout {layout!r} "
                                    f"under {self.root}")
        self.names = [p.stem[:-3] if layout == "srf" else p.stem for p in self.hr_files]

    def _detect(self, split: str) -> str:
        r, s = self.root, self.scale
        if (r / "HR").is_dir():
            return "benchmark"
        if (r / f"DIV2K_{split}_HR").is_dir():
            return "div2k"
        if (r / "GTmod12").is_dir():
            return "basicsr"
        if (r / f"image_SRF_{s}").is_dir():
            return "srf"
        if _list_images(r):
            return "flat"
        raise FileNotFoundError(
            f"{r} does not look like an SR data set: expected HR/ (+LR_bicubic/X{s}/), DIV2K_{split}_HR/, "
            f"GTmod12/ (+LRbicx{s}/), image_SRF_{s}/, or image files directly in it")

    def _find(self, layout: str, split: str) -> tuple[list[Path], list[Path] | None]:
        r, s = self.root, self.scale
        if layout == "srf":
            d = r / f"image_SRF_{s}"
            if not d.is_dir():
                raise FileNotFoundError(f"layout 'srf' needs {d}")
            hr = [p for p in _list_images(d) if p.stem.endswith("_HR")]
            lr = [p.with_name(p.stem[:-3] + "_LR" + p.suffix) for p in hr]
            return hr, lr
        hr_dir, lr_dir, lr_name = {
            "benchmark": (r / "HR", r / "LR_bicubic" / f"X{s}", lambda p: f"{p.stem}x{s}{p.suffix}"),
            "div2k": (r / f"DIV2K_{split}_HR", r / f"DIV2K_{split}_LR_bicubic" / f"X{s}",
                      lambda p: f"{p.stem}x{s}{p.suffix}"),
            "basicsr": (r / "GTmod12", r / f"LRbicx{s}", lambda p: p.name),
            "flat": (r, None, None),
        }[layout]
        if not hr_dir.is_dir():
            raise FileNotFoundError(f"layout {layout!r} needs the HR folder {hr_dir}")
        hr = _list_images(hr_dir)
        if lr_dir is None or not lr_dir.is_dir():
            return hr, None
        return hr, [lr_dir / lr_name(p) for p in hr]

    def __len__(self) -> int:
        return len(self.hr_files)

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image i as uint8 ``(lr (h, w, 3), hr (s*h, s*w, 3))``."""
        hr = mod_crop(read_image(self.hr_files[i]), self.scale)
        if self.lr_files is None:
            return bicubic_downscale(hr, self.scale), hr
        lr_path = self.lr_files[i]
        if not lr_path.is_file():
            raise FileNotFoundError(f"LR image {lr_path} for {self.hr_files[i].name} is missing")
        lr = read_image(lr_path)
        want = (hr.shape[0] // self.scale, hr.shape[1] // self.scale)
        if lr.shape[:2] != want:
            raise ValueError(f"LR image {lr_path} is {lr.shape[1]}x{lr.shape[0]}, expected {want[1]}x{want[0]} "
                             f"(HR {self.hr_files[i].name} / {self.scale})")
        return lr, hr

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lr, hr = self.pair(i)
        return to_tensor(lr), to_tensor(hr)


# ---------------------------------------------------------------------------------------------- patches
def _as_pairs(images, scale: int):
    """Normalise the accepted image collections to a list of (name, lr uint8, hr uint8)."""
    if isinstance(images, SRFolder):
        if images.scale != scale:
            raise ValueError(f"SRFolder has scale {images.scale}, asked for {scale}")
        return [(images.names[i], *images.pair(i)) for i in range(len(images))]
    out = []
    for k, item in enumerate(images):
        if isinstance(item, np.ndarray):
            name, rest = f"image{k}", (item,)
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], str):
            name, rest = item[0], tuple(item[1:])
        else:
            raise TypeError("images must be arrays, (name, hr) or (name, lr, hr) tuples, or an SRFolder")
        if len(rest) == 1:
            hr = mod_crop(_check_uint8(rest[0], name), scale)
            lr = bicubic_downscale(hr, scale)
        elif len(rest) == 2:
            lr, hr = (_check_uint8(a, name) for a in rest)
            hr = mod_crop(hr, scale)
            if lr.shape[:2] != (hr.shape[0] // scale, hr.shape[1] // scale):
                raise ValueError(f"{name}: LR {lr.shape[:2]} does not match HR {hr.shape[:2]} / {scale}")
        else:
            raise TypeError(f"{name}: expected (name, hr) or (name, lr, hr)")
        out.append((name, lr, hr))
    if not out:
        raise ValueError("no images given")
    return out


def _check_uint8(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{name}: expected a uint8 (H, W, 3) image, got {a.dtype} {a.shape}")
    return a


def augment(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random one of the 8 flips/rotations applied to every (H, W, C) array."""
    hflip, vflip, rot = rng.integers(0, 2, size=3)
    out = []
    for a in arrays:
        if hflip:
            a = a[:, ::-1]
        if vflip:
            a = a[::-1]
        if rot:
            a = a.transpose(1, 0, 2)
        out.append(a)
    return out


class SeededPatches(Dataset):
    """Base of the random-patch training sets: ``length`` items, item i drawn from the generator
    ``np.random.default_rng([seed, i])`` alone, so a set is deterministic and safe with DataLoader workers."""

    def __init__(self, patch_size: int, length: int, seed: int):
        if patch_size < 1 or length < 1:
            raise ValueError(f"patch_size and length must be positive, got {patch_size}, {length}")
        self.patch_size, self.length, self.seed = int(patch_size), int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def _window(self, i: int, entries: list[tuple]) -> tuple[np.random.Generator, tuple, int, int]:
        """Item i's generator, an entry drawn uniformly, and the top-left ``(y, x)`` of a uniform
        ``patch_size`` window in the entry's image ``entry[1]`` (H, W, C)."""
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        entry = entries[int(rng.integers(len(entries)))]
        p = self.patch_size
        y = int(rng.integers(entry[1].shape[0] - p + 1))
        x = int(rng.integers(entry[1].shape[1] - p + 1))
        return rng, entry, y, x


class SRPatchDataset(SeededPatches):
    """Random aligned patches: item i -> (lr (3, p, p), hr (3, p*s, p*s)) float32 in [0, 1].

    images: ``[(name, hr)]`` (LR by :func:`bicubic_downscale`), ``[(name, lr, hr)]``, plain uint8 arrays, or an
    :class:`SRFolder`.  Each item picks an image uniformly (among those whose LR holds a p x p patch), a
    uniform LR position, and (``augment``) one of the 8 flips/rotations.  Item i depends only on
    ``(seed, i)``, so the data set is deterministic and safe with DataLoader workers.
    """

    def __init__(self, images, scale: int, patch_size: int = 48, length: int = 1000, augment: bool = True,
                 seed: int = 0):
        self.scale = _check_scale(scale)
        super().__init__(patch_size, length, seed)
        self.augment = augment
        pairs = _as_pairs(images, self.scale)
        self.pairs = [p for p in pairs if min(p[1].shape[:2]) >= patch_size]
        if not self.pairs:
            raise ValueError(f"no image has an LR side >= patch_size {patch_size} at scale {scale}")
        self.names = [p[0] for p in self.pairs]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng, (_, lr, hr), y, x = self._window(i, self.pairs)
        p, s = self.patch_size, self.scale
        lr_p = lr[y: y + p, x: x + p]
        hr_p = hr[y * s: (y + p) * s, x * s: (x + p) * s]
        if self.augment:
            lr_p, hr_p = augment((lr_p, hr_p), rng)
        return to_tensor(lr_p), to_tensor(hr_p)


def sr_eval_pairs(images, scale: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Full images for evaluation: ``[(name, lr (3, h, w), hr (3, s*h, s*w))]`` float in [0, 1].

    images: as for :class:`SRPatchDataset` (HR is mod-cropped; LR is its bicubic downscale unless given).
    """
    return [(name, to_tensor(lr), to_tensor(hr)) for name, lr, hr in _as_pairs(images, _check_scale(scale))]


def calibration_crops(images, scale: int, side: int, limit: int | None = None) -> list[np.ndarray]:
    """LR centre crops ``(1, 3, side, side)`` float32 in [0, 1] of ``images`` (``[(name, hr uint8)]``,
    e.g. the built-in training photos): inputs for calibrating an int8 model; a photo whose LR is
    smaller than ``side`` is used whole."""
    out = []
    for _, lr, _ in _as_pairs(images[:limit] if limit else images, _check_scale(scale)):
        h, w = lr.shape[:2]
        top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
        crop = lr[top:top + side, left:left + side]
        out.append(to_tensor(crop)[None].numpy())
    return out

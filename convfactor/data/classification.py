"""Classification sets from local folders: CIFAR-10 python batches and ImageFolder trees.

Both return a ``torch.utils.data.Dataset`` of ``(image (3, H, W) float32, label int)``; images are scaled to
[0, 1] and, with ``normalize=True``, standardised with the set's channel mean/std.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import builtin_images
from .sr import IMAGE_EXTENSIONS, read_image

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "ArrayDataset", "cifar10", "image_folder", "builtin_patches"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class ArrayDataset(Dataset):
    """uint8 images (N, H, W, 3) + labels (N,) -> (float (3, H, W), int).

    ``augment``: the standard CIFAR recipe, a random crop after 4-pixel zero padding and a random horizontal
    flip (drawn from torch's global RNG, so seed it / the DataLoader for reproducibility).
    """

    def __init__(self, images: np.ndarray, labels, classes, normalize: bool = True, augment: bool = False,
                 mean=CIFAR10_MEAN, std=CIFAR10_STD):
        self.images = np.ascontiguousarray(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.images.ndim != 4 or self.images.shape[3] != 3 or len(self.images) != len(self.labels):
            raise ValueError(f"expected images (N, H, W, 3) and N labels, got {self.images.shape} and "
                             f"{self.labels.shape}")
        self.classes = list(classes)
        self.augment = augment
        self.mean = torch.tensor(mean).view(3, 1, 1) if normalize else None
        self.std = torch.tensor(std).view(3, 1, 1) if normalize else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div_(255.0)
        if self.augment:
            h, w = x.shape[1:]
            x = torch.nn.functional.pad(x, (4, 4, 4, 4))
            dy, dx = (int(v) for v in torch.randint(0, 9, (2,)))
            x = x[:, dy: dy + h, dx: dx + w]
            if torch.rand(()) < 0.5:
                x = x.flip(2)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x.contiguous(), int(self.labels[i])


def _find_cifar_dir(root: Path) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder {root} does not exist")
    for d in (root, root / "cifar-10-batches-py"):
        if (d / "test_batch").is_file() or (d / "data_batch_1").is_file():
            return d
    raise FileNotFoundError(f"{root} holds no CIFAR-10 python batches (data_batch_1..5, test_batch), "
                            f"nor a cifar-10-batches-py/ folder with them")


def _read_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch {path} is missing")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"] if b"data" in d else d["data"], dtype=np.uint8)
        labels = list(d[b"labels"] if b"labels" in d else d["labels"])
    except Exception as exc:
        raise ValueError(f"{path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise ValueError(f"{path} is malformed: data {data.shape}, {len(labels)} labels (expected (N, 3072), N)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def cifar10(root, train: bool = True, normalize: bool = True, augment: bool | None = None) -> ArrayDataset:
    """CIFAR-10 from the python batches in ``root`` (or ``root/cifar-10-batches-py``); nothing is downloaded.

    train: the 5 ``data_batch_*`` (50 000 images) or ``test_batch`` (10 000).  augment defaults to ``train``.
    """
    d = _find_cifar_dir(Path(root))
    files = [d / f"data_batch_{i}" for i in range(1, 6)] if train else [d / "test_batch"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder {d} lacks {', '.join(missing)}")
    parts = [_read_batch(f) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = sum((p[1] for p in parts), [])
    return ArrayDataset(images, labels, CIFAR10_CLASSES, normalize, train if augment is None else augment)


def image_folder(root, size: int | None = None, normalize: bool = True, augment: bool = False,
                 mean=None, std=None) -> ArrayDataset:
    """An ImageFolder tree ``root/CLASS/*.png``: classes are the sorted sub-folder names, labels their index.

    Images are read into memory as RGB and, with ``size``, resized (bicubic) to size x size; without it all
    images must share one size.  ``normalize`` uses ``mean``/``std`` if given, else the set's own statistics.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise FileNotFoundError(f"{root} has no class sub-folders (expected root/CLASS/image.png)")
    images, labels = [], []
    for label, cdir in enumerate(class_dirs):
        files = sorted(p for p in cdir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"class folder {cdir} holds no images ({'/'.join(IMAGE_EXTENSIONS)})")
        for f in files:
            img = read_image(f)
            if size is not None:
                from PIL import Image
                img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
            images.append(img)
            labels.append(label)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {root} have different sizes {sorted(shapes)[:3]}...; pass size=")
    arr = np.stack(images)
    if normalize and mean is None:
        mean = tuple(float(v) for v in arr.reshape(-1, 3).mean(0) / 255.0)
        std = tuple(float(max(v, 1e-3)) for v in arr.reshape(-1, 3).std(0) / 255.0)
    return ArrayDataset(arr, labels, [p.name for p in class_dirs], normalize, augment,
                        mean if mean is not None else CIFAR10_MEAN, std if std is not None else CIFAR10_STD)


def builtin_patches(train: bool = True, size: int = 32, per_class: int = 500, seed: int = 0,
                    normalize: bool = True, augment: bool | None = None) -> ArrayDataset:
    """A small offline classification set: which built-in photo does a ``size`` x ``size`` patch come from?

    The 21 classes are the images of :func:`convfactor.data.images.builtin_images` ("all", in that order).
    Train patches come from the top 75% of each image's rows, test patches from the bottom 25%, with no
    overlap between the two bands; ``per_class`` patches per class at seeded random positions (test: a
    quarter as many).  augment (random crop + flip) defaults to ``train``.  Images smaller than the test
    band (``microaneurysms`` for size > 25) contribute patches resized from the whole band.
    """
    if size < 4 or per_class < 1:
        raise ValueError(f"size must be >= 4 and per_class >= 1, got {size}, {per_class}")
    rng = np.random.default_rng([seed, 1 if train else 2])
    n = per_class if train else max(1, per_class // 4)
    images, labels, classes = [], [], []
    for label, (name, img) in enumerate(builtin_images("all")):
        h = img.shape[0]
        cut = int(round(h * 0.75))
        band = img[:cut] if train else img[cut:]
        if band.shape[0] < size or band.shape[1] < size:
            from PIL import Image
            side = max(size, min(band.shape[:2]))
            band = np.asarray(Image.fromarray(np.ascontiguousarray(band)).resize((max(side, band.shape[1]), side),
                                                                                Image.BICUBIC))
        ys = rng.integers(0, band.shape[0] - size + 1, n)
        xs = rng.integers(0, band.shape[1] - size + 1, n)
        images += [band[y: y + size, x: x + size] for y, x in zip(ys, xs)]
        labels += [label] * n
        classes.append(name)
    arr = np.stack(images)
    return ArrayDataset(arr, labels, classes, normalize, train if augment is None else augment,
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

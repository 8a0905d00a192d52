"""Training sets for :func:`convfactor.finetune` by task: the built-in photos or a folder."""
from __future__ import annotations

from pathlib import Path

from ..data import classification
from ..data.denoise import DenoisePatchDataset
from ..data.images import builtin_images
from ..data.sr import SRFolder, SRPatchDataset

__all__ = ["training_set"]


def training_set(task: str, source: str = "builtin", *, scale: int | None = None, sigma: float = 25.0,
                 patch_size: int | None = None, length: int = 100_000, seed: int = 0, grey: bool = True,
                 max_side: int | None = None):
    """A map-style data set of ``(input, target)`` pairs.

    ``task``: ``"sr"`` (random LR/HR patches, :class:`convfactor.data.sr.SRPatchDataset`; ``source`` is
    ``"builtin"`` or an SR folder in a DIV2K/Set5/Set14/B100/Urban100/flat layout), ``"denoise"``
    (noisy/clean patches at ``sigma``; ``"builtin"`` or a folder of images) or ``"classification"``
    (CIFAR-10 python batches or an ImageFolder tree; ``"builtin"`` gives the built-in photo patches).
    ``max_side`` centre-crops the built-in training photos (quick runs).
    """
    if source != "builtin" and not Path(source).exists():
        raise FileNotFoundError(f"training data {source} does not exist")
    builtin = source == "builtin"
    if task == "sr":
        if not scale:
            raise ValueError("an SR training set needs scale=")
        images = builtin_images("train", max_side=max_side) if builtin else SRFolder(source, scale)
        return SRPatchDataset(images, scale, patch_size or 48, length, augment=True, seed=seed)
    if task == "denoise":
        images = builtin_images("train", max_side=max_side) if builtin else _folder_images(source)
        return DenoisePatchDataset(images, sigma, patch_size or 40, length, grey=grey, seed=seed)
    if task == "classification":
        return classification.builtin_patches(train=True, seed=seed) if builtin else _classification(Path(source),
                                                                                                     patch_size)
    raise ValueError(f"unknown task {task!r} (sr, denoise or classification)")


def _folder_images(source: str) -> list:
    """``[(name, uint8 (H, W, 3))]`` of every image in a flat folder."""
    folder = SRFolder(source, 1, layout="flat")
    return [(folder.names[i], folder.pair(i)[1]) for i in range(len(folder))]


def _classification(root: Path, patch_size: int | None):
    """CIFAR-10 python batches when ``root`` holds them, else an ImageFolder tree (augmented)."""
    if any(root.glob("data_batch_*")) or (root / "cifar-10-batches-py").is_dir():
        return classification.cifar10(root, train=True)
    return classification.image_folder(root, size=patch_size, augment=True)

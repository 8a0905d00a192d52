"""Training sets for :func:`convfactor.finetune` by task: the built-in photos or a folder."""
from __future__ import annotations

from pathlib import Path

__all__ = ["training_set"]


def training_set(task: str, source: str = "builtin", *, scale: int | None = None, sigma: float = 25.0,
                 patch_size: int | None = None, length: int = 100_000, seed: int = 0, grey: bool = True):
    """A map-style data set of ``(input, target)`` pairs.

    ``task``: ``"sr"`` (random LR/HR patches, :class:`convfactor.data.sr.SRPatchDataset`; ``source`` is
    ``"builtin"`` or an SR folder in a DIV2K/Set5/Set14/B100/Urban100/flat layout), ``"denoise"``
    (noisy/clean patches at ``sigma``; ``"builtin"`` or a folder of images) or ``"classification"``
    (CIFAR-10 python batches or an ImageFolder tree; ``"builtin"`` gives the built-in photo patches).
    """
    if source != "builtin" and not Path(source).exists():
        raise FileNotFoundError(f"training data {source} does not exist")
    if task == "sr":
        if not scale:
            raise ValueError("an SR training set needs scale=")
        from ..data.sr import SRFolder, SRPatchDataset
        if source == "builtin":
            from ..data.images import builtin_images
            images = builtin_images("train")
        else:
            images = SRFolder(source, scale)
        return SRPatchDataset(images, scale, patch_size or 48, length, augment=True, seed=seed)
    if task == "denoise":
        from ..data.denoise import DenoisePatchDataset
        if source == "builtin":
            from ..data.images import builtin_images
            images = builtin_images("train")
        else:
            from ..data.sr import SRFolder
            folder = SRFolder(source, 1, layout="flat")
            images = [(folder.names[i], folder.pair(i)[1]) for i in range(len(folder))]
        return DenoisePatchDataset(images, sigma, patch_size or 40, length, grey=grey, seed=seed)
    if task == "classification":
        from ..data import classification as cls
        if source == "builtin":
            return cls.builtin_patches(train=True, seed=seed)
        root = Path(source)
        if any(root.glob("data_batch_*")) or (root / "cifar-10-batches-py").is_dir():
            return cls.cifar10(root, train=True)
        return cls.image_folder(root, size=patch_size, augment=True)
    raise ValueError(f"unknown task {task!r} (sr, denoise or classification)")

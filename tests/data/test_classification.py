import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from convfactor.data import classification as cls


def _write_batch(path, n, seed, label_key=b"labels"):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"data": data, label_key: labels}, f)
    return data, labels


def test_cifar10_from_batches(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        _write_batch(d / f"data_batch_{i}", 4, i)
    test_data, test_labels = _write_batch(d / "test_batch", 3, 9)
    train = cls.cifar10(tmp_path, train=True)
    assert len(train) == 20 and train.augment
    test = cls.cifar10(tmp_path, train=False, normalize=False)
    assert len(test) == 3 and not test.augment
    x, y = test[2]
    assert x.shape == (3, 32, 32) and y == test_labels[2]
    # channel-major rows: first 1024 values are the red plane
    assert torch.allclose(x[0].flatten() * 255, torch.from_numpy(test_data[2, :1024]).float())
    xn, _ = cls.cifar10(d, train=False)[2]
    mean = torch.tensor(cls.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(cls.CIFAR10_STD).view(3, 1, 1)
    assert torch.allclose(xn, (x - mean) / std)
    xa, _ = train[0]
    assert xa.shape == (3, 32, 32)


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cls.cifar10(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no CIFAR-10"):
        cls.cifar10(tmp_path)
    _write_batch(tmp_path / "data_batch_1", 2, 0)
    with pytest.raises(FileNotFoundError, match="data_batch_2"):
        cls.cifar10(tmp_path, train=True)
    (tmp_path / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a CIFAR-10"):
        cls.cifar10(tmp_path, train=False)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="malformed"):
        cls.cifar10(tmp_path, train=False)


def _png(path, color, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder(tmp_path):
    _png(tmp_path / "cat" / "1.png", (255, 0, 0))
    _png(tmp_path / "cat" / "2.png", (250, 0, 0))
    _png(tmp_path / "dog" / "sub" / "1.png", (0, 0, 255))
    ds = cls.image_folder(tmp_path, normalize=False)
    assert ds.classes == ["cat", "dog"] and len(ds) == 3
    x, y = ds[2]
    assert y == 1 and x.shape == (3, 8, 8) and torch.allclose(x[2], torch.ones(8, 8))
    resized = cls.image_folder(tmp_path, size=4)
    assert resized[0][0].shape == (3, 4, 4)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cls.image_folder(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        cls.image_folder(tmp_path)
    _png(tmp_path / "a" / "1.png", (1, 2, 3))
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        cls.image_folder(tmp_path)
    _png(tmp_path / "b" / "1.png", (1, 2, 3), size=(5, 6))
    with pytest.raises(ValueError, match="different sizes"):
        cls.image_folder(tmp_path)


def test_builtin_patches_disjoint_bands():
    tr = cls.builtin_patches(train=True, size=16, per_class=8, normalize=False)
    te = cls.builtin_patches(train=False, size=16, per_class=8, normalize=False)
    assert len(tr.classes) == 21 and tr.classes == te.classes
    assert len(tr) == 21 * 8 and len(te) == 21 * 2
    assert tr.images.shape[1:] == (16, 16, 3) and set(te.labels.tolist()) == set(range(21))
    # a test patch never appears verbatim among the training patches of its class (disjoint row bands)
    from convfactor.data.images import load_builtin
    astro = tr.classes.index("astronaut")
    img = load_builtin("astronaut")
    cut = int(round(img.shape[0] * 0.75))
    for patch in te.images[te.labels == astro]:
        hits = [(y, x) for y in range(img.shape[0] - 15) for x in range(0, img.shape[1] - 15, 1)
                if img[y, x, 0] == patch[0, 0, 0] and np.array_equal(img[y:y + 16, x:x + 16], patch)]
        assert hits and all(y >= cut for y, _ in hits)
    x, y = cls.builtin_patches(train=True, size=16, per_class=2)[0]
    assert x.shape == (3, 16, 16) and y == 0

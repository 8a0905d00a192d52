import numpy as np
import pytest

from convfactor.data import images


def test_split_is_fixed_disjoint_and_complete():
    train = [n for n, _ in images.builtin_images("train")]
    test = [n for n, _ in images.builtin_images("test")]
    allnames = [n for n, _ in images.builtin_images("all")]
    assert not set(train) & set(test)
    assert allnames == train + test and len(allnames) == 21 and "eagle" not in allnames
    assert {"astronaut", "chelsea", "coffee", "camera"} <= set(test)
    for _, img in images.builtin_images("all"):
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    with pytest.raises(ValueError, match="split"):
        images.builtin_images("val")


def test_conversions_of_special_images():
    horse = dict(images.builtin_images("train"))["horse"]
    assert set(np.unique(horse)) <= {0, 255}
    camera = images.load_builtin("camera")
    assert (camera[..., 0] == camera[..., 1]).all() and (camera[..., 1] == camera[..., 2]).all()
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)   # opaque keeps its colour, transparent becomes white
    out = images.to_rgb(rgba)
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (255, 255, 255)
    with pytest.raises(KeyError):
        images.load_builtin("eagle")


def test_center_crop_and_shrunk_splits():
    img = np.arange(9 * 7 * 3, dtype=np.uint8).reshape(9, 7, 3)
    crop = images.center_crop(img, 5)
    assert crop.shape == (4, 4, 3)                         # even sides, at most max_side
    assert np.array_equal(crop, img[2:6, 1:5])             # centred
    assert images.center_crop(img, None) is img and images.center_crop(img, 100).shape == (8, 6, 3)
    held_out = images.builtin_images("test", max_side=48, limit=2)
    assert [n for n, _ in held_out] == list(images.TEST[:2])
    full = dict(images.builtin_images("test"))
    for name, a in held_out:
        assert a.shape == (48, 48, 3) and np.array_equal(a, images.center_crop(full[name], 48))

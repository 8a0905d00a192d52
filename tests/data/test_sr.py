import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from convfactor.data import sr


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_imresize_interior_matches_torch_antialiased_bicubic():
    # Same kernel (Keys, a=-0.5, widened by the scale) as PIL/torch's antialiased bicubic; only borders differ.
    x = torch.rand(1, 3, 48, 60, dtype=torch.float64)
    for s in (2, 3, 4):
        ours = sr.imresize(x, size=(48 // s, 60 // s))
        ref = F.interpolate(x, size=(48 // s, 60 // s), mode="bicubic", antialias=True, align_corners=False)
        m = 8 // s + 2
        assert torch.allclose(ours[..., m:-m, m:-m], ref[..., m:-m, m:-m], atol=1e-10)
        up = sr.imresize(x, scale=s)
        ref = F.interpolate(x, scale_factor=s, mode="bicubic", antialias=True, align_corners=False)
        assert torch.allclose(up[..., 3 * s:-3 * s, 3 * s:-3 * s], ref[..., 3 * s:-3 * s, 3 * s:-3 * s], atol=1e-10)


def test_imresize_borders_are_symmetric_padding():
    x = np.random.default_rng(1).random((30, 36))
    pad = 12
    padded = np.pad(x, pad, mode="symmetric")
    for s in (2, 3):
        ours = sr.imresize(x, size=(30 // s, 36 // s))
        ref = sr.imresize(padded, size=(padded.shape[0] // s, padded.shape[1] // s))[pad // s: -pad // s,
                                                                                       pad // s: -pad // s]
        assert np.allclose(ours, ref, atol=1e-12)


def test_bicubic_downscale_convention():
    hr = _img(35, 41)
    lr = sr.bicubic_downscale(hr, 2)
    assert lr.dtype == np.uint8 and lr.shape == (17, 20, 3)
    assert np.array_equal(lr, sr.bicubic_downscale(hr[:34, :40], 2))       # mod-crop first
    flat = np.full((24, 24, 3), 77, np.uint8)
    assert (sr.bicubic_downscale(flat, 3) == 77).all() and (sr.bicubic_upscale(flat, 2) == 77).all()
    t = torch.from_numpy(hr[:34, :40]).permute(2, 0, 1).double() / 255
    assert torch.allclose(sr.bicubic_downscale(t, 2) * 255,
                          torch.from_numpy(sr.imresize(hr[:34, :40].astype(float), size=(17, 20))).permute(2, 0, 1))
    with pytest.raises(ValueError):
        sr.bicubic_downscale(hr, 0)


def _blocky_pair(h, w, s, seed=0):
    lr = _img(h, w, seed)
    return lr, np.repeat(np.repeat(lr, s, 0), s, 1)


def test_patches_are_aligned_under_augmentation_and_deterministic():
    s = 3
    lr, hr = _blocky_pair(20, 26, s)
    ds = sr.SRPatchDataset([("a", lr, hr)], scale=s, patch_size=8, length=40, seed=5)
    seen_values = set()
    for i in range(len(ds)):
        l, h = ds[i]
        assert l.shape == (3, 8, 8) and h.shape == (3, 24, 24) and l.dtype == torch.float32
        assert 0 <= l.min() and l.max() <= 1
        # HR is LR upsampled by pixel repetition, so each s x s HR block must equal its LR pixel
        assert torch.equal(h, l.repeat_interleave(s, 1).repeat_interleave(s, 2))
        seen_values.add(tuple(l[0, 0, :2].tolist()))
    assert len(seen_values) > 10
    again = sr.SRPatchDataset([("a", lr, hr)], scale=s, patch_size=8, length=40, seed=5)
    assert all(torch.equal(ds[i][0], again[i][0]) for i in range(5))
    other = sr.SRPatchDataset([("a", lr, hr)], scale=s, patch_size=8, length=40, seed=6)
    assert not all(torch.equal(ds[i][0], other[i][0]) for i in range(5))
    with pytest.raises(IndexError):
        ds[40]


def test_patches_from_hr_only_use_bicubic_lr():
    hr = _img(40, 44)
    ds = sr.SRPatchDataset([("x", hr)], scale=2, patch_size=20, length=3, augment=False)
    lr_full = sr.bicubic_downscale(hr, 2)
    l, h = ds[0]
    lr_u8 = (l * 255).round().byte().permute(1, 2, 0).numpy()
    hits = [(y, x) for y in range(3) for x in range(3) if np.array_equal(lr_full[y:y + 20, x:x + 20], lr_u8)]
    assert hits
    y, x = hits[0]
    assert np.array_equal((h * 255).round().byte().permute(1, 2, 0).numpy(), hr[2 * y:2 * y + 40, 2 * x:2 * x + 40])
    with pytest.raises(ValueError, match="patch_size"):
        sr.SRPatchDataset([("x", hr)], scale=2, patch_size=30, length=3)


def test_eval_pairs():
    pairs = sr.sr_eval_pairs([("a", _img(33, 30))], 4)
    name, lr, hr = pairs[0]
    assert name == "a" and lr.shape == (3, 8, 7) and hr.shape == (3, 32, 28)


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.mark.parametrize("layout", ["benchmark", "div2k", "basicsr", "srf", "flat"])
def test_srfolder_layouts(tmp_path, layout):
    s = 2
    hrs = {"baby": _img(20, 18, 1), "bird": _img(17, 16, 2)}
    for name, hr in hrs.items():
        lr = sr.bicubic_downscale(hr, s)
        if layout == "benchmark":
            _save(tmp_path / "HR" / f"{name}.png", hr)
            _save(tmp_path / "LR_bicubic" / f"X{s}" / f"{name}x{s}.png", lr)
        elif layout == "div2k":
            _save(tmp_path / "DIV2K_valid_HR" / f"{name}.png", hr)
            _save(tmp_path / "DIV2K_valid_LR_bicubic" / f"X{s}" / f"{name}x{s}.png", lr)
        elif layout == "basicsr":
            _save(tmp_path / "GTmod12" / f"{name}.png", hr)
            _save(tmp_path / f"LRbicx{s}" / f"{name}.png", lr)
        elif layout == "srf":
            _save(tmp_path / f"image_SRF_{s}" / f"{name}_HR.png", hr)
            _save(tmp_path / f"image_SRF_{s}" / f"{name}_LR.png", lr)
        else:
            _save(tmp_path / f"{name}.png", hr)
    ds = sr.SRFolder(tmp_path, s)  # DIV2K: falls back to the valid split when there is no train split
    assert ds.layout == layout and ds.names == ["baby", "bird"] and len(ds) == 2
    assert (ds.lr_files is None) == (layout == "flat")
    lr, hr = ds[1]
    assert hr.shape == (3, 16, 16) and lr.shape == (3, 8, 8)
    assert torch.equal(lr, sr.to_tensor(sr.bicubic_downscale(hrs["bird"], s)))
    patches = sr.SRPatchDataset(ds, s, patch_size=4, length=3)
    assert patches[0][1].shape == (3, 8, 8)


def test_srfolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sr.SRFolder(tmp_path / "nope", 2)
    with pytest.raises(FileNotFoundError, match="does not look like"):
        sr.SRFolder(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="HR folder"):
        sr.SRFolder(tmp_path, 2, layout="benchmark")
    with pytest.raises(ValueError, match="layout"):
        sr.SRFolder(tmp_path, 2, layout="weird")
    _save(tmp_path / "HR" / "a.png", _img(8, 8))
    _save(tmp_path / "HR" / "b.png", _img(8, 8))
    _save(tmp_path / "LR_bicubic" / "X2" / "ax2.png", _img(3, 4))
    ds = sr.SRFolder(tmp_path, 2)
    with pytest.raises(ValueError, match="expected 4x4"):
        ds.pair(0)
    with pytest.raises(FileNotFoundError, match="bx2.png"):
        ds.pair(1)
    (tmp_path / "HR" / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read"):
        sr.SRFolder(tmp_path, 2).pair(2)

import numpy as np
import pytest
import torch

from convfactor.data import denoise


def test_add_noise_statistics_and_determinism():
    img = torch.full((1, 200, 200), 0.5, dtype=torch.float64)
    a = denoise.add_noise(img, 25, torch.Generator().manual_seed(3))
    b = denoise.add_noise(img, 25, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    resid = (a - img) * 255
    assert abs(resid.std().item() - 25) < 0.5 and abs(resid.mean().item()) < 0.5
    assert torch.equal(denoise.add_noise(img, 0), img)
    with pytest.raises(ValueError):
        denoise.add_noise(img, -1)


def test_to_grey_bt601():
    img = np.zeros((1, 3, 3), np.uint8)
    img[0, 0] = (255, 0, 0)
    img[0, 1] = (0, 255, 0)
    img[0, 2] = (0, 0, 255)
    assert denoise.to_grey(img).tolist() == [[76, 150, 29]]   # round(255 * (0.299, 0.587, 0.114))


@pytest.mark.parametrize("grey", [True, False])
def test_patch_dataset(grey):
    rng = np.random.default_rng(0)
    imgs = [("a", rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)), ("tiny", np.zeros((5, 5, 3), np.uint8))]
    ds = denoise.DenoisePatchDataset(imgs, sigma=15, patch_size=16, length=50, grey=grey, seed=1)
    c = 1 if grey else 3
    resid = []
    for i in range(len(ds)):
        noisy, clean = ds[i]
        assert noisy.shape == clean.shape == (c, 16, 16)
        assert clean.min() >= 0 and clean.max() <= 1
        resid.append(noisy - clean)
    assert abs(torch.stack(resid).std().item() * 255 - 15) < 0.5
    assert torch.equal(ds[7][0], denoise.DenoisePatchDataset(imgs, 15, 16, 50, grey=grey, seed=1)[7][0])
    blind = denoise.DenoisePatchDataset(imgs, sigma=(0, 50), patch_size=16, length=20, grey=grey)
    stds = [((n - c_) * 255).std().item() for n, c_ in (blind[i] for i in range(20))]
    assert max(stds) - min(stds) > 10
    with pytest.raises(ValueError):
        denoise.DenoisePatchDataset(imgs, sigma=15, patch_size=64, length=5)


def test_eval_images():
    out = denoise.denoise_eval_images([("x", np.zeros((9, 7, 3), np.uint8))], grey=True)
    assert out[0][0] == "x" and out[0][1].shape == (1, 9, 7)


def test_eval_noise_is_fixed_by_name_and_seed():
    clean = torch.full((1, 40, 40), 0.5)
    a = denoise.eval_noisy("coins", clean, 25)
    assert torch.equal(a, denoise.eval_noisy("coins", clean.clone(), 25))      # same name: same noise
    assert not torch.equal(a, denoise.eval_noisy("camera", clean, 25))         # another image: other noise
    assert not torch.equal(a, denoise.eval_noisy("coins", clean, 25, seed=1))  # another seed: other noise
    assert a.dtype == clean.dtype and a.shape == clean.shape
    assert abs(((a - clean) * 255).std().item() - 25) < 2.0

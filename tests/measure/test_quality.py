"""PSNR/SSIM against scikit-image on the same BT.601 Y images; accuracy; the evaluate helpers."""
import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from convfactor.measure import quality as q


def _pair(seed=0, h=40, w=36):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pred = np.clip(target.astype(int) + rng.integers(-20, 21, target.shape), 0, 255).astype(np.uint8)
    return pred, target


def _y_ref(img_u8, shave):
    """BT.601 Y written out independently (BasicSR's rgb2ycbcr, y_only)."""
    f = img_u8.astype(np.float64)
    y = 16.0 + (65.481 * f[..., 0] + 128.553 * f[..., 1] + 24.966 * f[..., 2]) / 255.0
    return y[shave:-shave, shave:-shave] if shave else y


def _sk_ssim(a, b, **kw):
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=255, **kw)


@pytest.mark.parametrize("shave", [0, 2, 4])
def test_against_scikit_image_on_y(shave):
    pred, target = _pair(shave)
    yp, yt = _y_ref(pred, shave), _y_ref(target, shave)
    assert abs(q.psnr(pred, target, scale=shave) - peak_signal_noise_ratio(yt, yp, data_range=255)) < 1e-6
    assert abs(q.ssim(pred, target, scale=shave) - _sk_ssim(yt, yp)) < 1e-6


def test_tensor_inputs_are_quantized_and_batched():
    pred, target = _pair(1)
    tp = torch.from_numpy(pred).permute(2, 0, 1).float() / 255
    tt = torch.from_numpy(target).permute(2, 0, 1).float() / 255
    # sub-half-level perturbations vanish under 8-bit quantisation
    noisy = tp + (torch.rand_like(tp) - 0.5) * (0.9 / 255)
    assert q.psnr(noisy, tt, scale=2) == pytest.approx(q.psnr(pred, target, scale=2), abs=1e-9)
    assert q.ssim(noisy, tt, scale=2) == pytest.approx(q.ssim(pred, target, scale=2), abs=1e-9)
    pred2, target2 = _pair(2)
    batch_p = torch.stack([tp, torch.from_numpy(pred2).permute(2, 0, 1).float() / 255])
    batch_t = torch.stack([tt, torch.from_numpy(target2).permute(2, 0, 1).float() / 255])
    expect = (q.psnr(pred, target) + q.psnr(pred2, target2)) / 2
    assert q.psnr(batch_p, batch_t) == pytest.approx(expect, abs=1e-9)
    # out-of-range floats are clipped like a saved PNG
    assert q.psnr(tt + 2.0, torch.ones_like(tt)) == math.inf


def test_rgb_mode_and_grey():
    pred, target = _pair(3)
    ref_p = peak_signal_noise_ratio(target, pred, data_range=255)
    assert abs(q.psnr(pred, target, y_channel=False) - ref_p) < 1e-6
    ref_s = _sk_ssim(target.astype(np.float64), pred.astype(np.float64), channel_axis=2)
    assert abs(q.ssim(pred, target, y_channel=False) - ref_s) < 1e-6
    g_p, g_t = pred[..., 0], target[..., 0]
    assert abs(q.ssim(g_p, g_t) - _sk_ssim(g_t.astype(float), g_p.astype(float))) < 1e-6


def test_identical_and_errors():
    _, target = _pair(4)
    assert q.psnr(target, target) == math.inf and q.ssim(target, target) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        q.psnr(target, target[:-1])
    with pytest.raises(ValueError, match="too small"):
        q.psnr(target, target, scale=20)
    with pytest.raises(ValueError, match="11x11"):
        q.ssim(target[:12, :12], target[:12, :12], scale=1)


def test_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5], [0.5, 0.3, 0.2]])
    labels = torch.tensor([1, 1, 0, 2])
    # top-1: only sample 0; top-2: samples 0 and 1; top-5 > classes counts every sample
    assert q.accuracy(logits, labels, topk=(1, 2, 5)) == {"top1": 25.0, "top2": 50.0, "top5": 100.0}
    with pytest.raises(ValueError):
        q.accuracy(logits, labels[:2])


class _Bicubic(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        from convfactor.data.sr import bicubic_upscale
        return bicubic_upscale(x.double(), self.scale).float()


def test_evaluate_sr_with_a_bicubic_model_equals_the_baseline():
    rng = np.random.default_rng(0)
    images = [(f"i{k}", rng.integers(0, 256, (34, 30, 3), dtype=np.uint8)) for k in range(2)]
    res = q.evaluate(_Bicubic(2), "sr", images, scale=2)
    assert res["psnr"] == pytest.approx(res["bicubic_psnr"], abs=1e-4)
    assert res["ssim"] == pytest.approx(res["bicubic_ssim"], abs=1e-5)
    assert [r["name"] for r in res["images"]] == ["i0", "i1"]
    with pytest.raises(ValueError, match="scale"):
        q.evaluate(_Bicubic(2), "sr", images, scale=3)
    with pytest.raises(ValueError, match="needs scale"):
        q.evaluate(_Bicubic(2), "sr", images)


def test_evaluate_denoise_identity_model_equals_noisy_baseline():
    rng = np.random.default_rng(1)
    images = [("a", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))]
    ident = nn.Conv2d(1, 1, 1, bias=False)
    nn.init.ones_(ident.weight)
    res = q.evaluate(ident, "denoise", images, sigma=25)
    assert res["psnr"] == pytest.approx(res["noisy_psnr"], abs=1e-4)
    assert 18 < res["noisy_psnr"] < 24            # sigma 25 on 0-255: about 20 dB
    again = q.evaluate(ident, "denoise", images, sigma=25)
    assert again["noisy_psnr"] == res["noisy_psnr"]
    # the noise is the data layer's fixed per-image noise, the one every command and the pipeline use
    from convfactor.data.denoise import denoise_eval_images, eval_noisy
    name, clean = denoise_eval_images(images)[0]
    assert res["images"][0]["noisy_psnr"] == q.psnr(eval_noisy(name, clean, 25), clean, y_channel=False)


def test_evaluate_classification_counts():
    torch.manual_seed(0)
    x = torch.randn(37, 5)
    y = torch.randint(0, 4, (37,))
    model = nn.Linear(5, 4)
    from torch.utils.data import TensorDataset
    res = q.evaluate(model, "classification", TensorDataset(x, y), batch_size=8, topk=(1, 3))
    with torch.no_grad():
        ref = q.accuracy(model(x), y, topk=(1, 3))
    assert res["n"] == 37
    assert res["top1"] == pytest.approx(ref["top1"]) and res["top3"] == pytest.approx(ref["top3"])
    with pytest.raises(ValueError, match="unknown task"):
        q.evaluate(model, "detection", None)


# ---------------------------------------------------------------------------------------------- the CLI
def _folder(tmp_path, n=2, size=(26, 24)):
    from PIL import Image
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(d / f"im{k}.png")
    return d


def test_cli_evaluate_sr_folder(tmp_path, capsys):
    import json

    from convfactor.cli import main
    from convfactor.data.sr import SRFolder
    d = _folder(tmp_path)
    assert main(["evaluate", "edsr_baseline_x2", "--data", str(d), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "sr" and res["scale"] == 2 and len(res["images"]) == 2
    from convfactor.data.sr import bicubic_upscale
    lr, hr = SRFolder(d, 2)[0]
    assert res["images"][0]["bicubic_psnr"] == pytest.approx(q.psnr(bicubic_upscale(lr.double(), 2), hr, scale=2))
    assert main(["evaluate", "edsr_baseline_x2", "--data", str(d)]) == 0
    out = capsys.readouterr().out
    assert "bicubic PSNR" in out and "PSNR-Y gain over bicubic" in out


def test_cli_evaluate_denoise_and_classification(tmp_path, capsys):
    import json
    import pickle

    from convfactor.cli import main
    d = _folder(tmp_path, n=1, size=(20, 20))
    assert main(["evaluate", "dncnn", "--data", str(d), "--sigma", "15", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "denoise" and res["sigma"] == 15
    assert abs(res["noisy_psnr"] - 20 * math.log10(255 / 15)) < 1.0
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    with open(cifar / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2]}, f)
    assert main(["evaluate", "resnet20", "--data", str(cifar), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 3 and 0 <= res["top1"] <= 100 and res["top5"] >= res["top1"]


def test_cli_evaluate_errors(tmp_path, capsys):
    from convfactor.cli import main
    assert main(["evaluate", "resnet20"]) == 2
    assert "no built-in classification set" in capsys.readouterr().err
    assert main(["evaluate", "edsr_baseline_x2", "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "edsr_baseline_x2", "--data", str(tmp_path)]) == 2
    assert "does not look like" in capsys.readouterr().err


def test_cli_evaluate_max_side_and_limit(tmp_path, capsys):
    import json

    from convfactor.cli import main
    from convfactor.data.sr import SRFolder, bicubic_upscale
    d = _folder(tmp_path, n=3, size=(40, 36))
    assert main(["evaluate", "edsr_baseline_x2", "--data", str(d), "--json", "--max-side", "20", "--limit", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["images"]) == 2
    lr, hr = SRFolder(d, 2)[0]
    lr_c, hr_c = lr[:, 5:15, 4:14], hr[:, 10:30, 8:28]     # centred 20x20 window of the 40x36 HR, and its LR
    assert res["images"][0]["bicubic_psnr"] == pytest.approx(q.psnr(bicubic_upscale(lr_c.double(), 2), hr_c, scale=2))

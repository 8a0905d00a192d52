"""The super-resolution seeds' experiments: their building blocks, and one smoke run each."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convfactor import models
from benchmarks import experiments, sr_seeds
from convfactor.compression.api import compress
from convfactor.models.edsr import bilinear_init


def test_bicubic_skip_starts_as_bicubic_and_stays_trainable():
    torch.manual_seed(0)
    model = sr_seeds.BicubicSkip(models.get("rrdbnet_x4", num_blocks=1, feats=8, grow=4), 4)
    x = torch.rand(1, 3, 9, 7)
    expected = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
    assert torch.equal(model(x), expected)                   # zero last conv: exactly bicubic
    model(x).sum().backward()
    last = [m for m in model.net.modules() if isinstance(m, nn.Conv2d)][-1]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0


def test_bilinear_init_makes_edsr_x2_interpolate():
    torch.manual_seed(0)
    model = models.get("edsr_baseline_x2")
    bilinear_init(model)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert (out - ref)[inner].abs().mean() < 0.05 * ref.abs().mean()
    try:
        bilinear_init(models.get("edsr_baseline_x4"))
    except ValueError as exc:
        assert "x2" in str(exc)
    else:
        raise AssertionError("bilinear_init accepted an x4 model")
    from convfactor.models.edsr import EDSR
    narrow = EDSR(1, 2, 2, 1.0)
    before = [p.clone() for p in narrow.parameters()]
    try:
        bilinear_init(narrow)
    except ValueError as exc:
        assert "3 features" in str(exc)
    else:
        raise AssertionError("bilinear_init accepted a 2-feature model")
    assert all(torch.equal(a, b) for a, b in zip(before, narrow.parameters()))   # refused before any change


def test_table2_block_weights_of_the_srresnet_operating_points():
    model = sr_seeds.BicubicSkip(models.get("srresnet_x4", n_blocks=2), 4)
    patterns = ["net.body.*.body.0", "net.body.*.body.3"]
    assert round(sr_seeds.block_weights(model, patterns) / 1000) == 74
    for label, p, m in (("Basis-64-14", 64, 14), ("Basis-32-32", 32, 32)):
        small, _ = compress(model, [{"op_names": patterns, "method": "basis", "rank": m, "splits": 64 // p}])
        assert round(sr_seeds.block_weights(small, patterns) / 1000) == sr_seeds.LI_TABLE2_K[label]


def test_experiments_are_registered():
    assert {"sedky_rrdbnet", "li_operating_points"} <= set(experiments.NAMES)


def test_sedky_smoke():
    torch.set_num_threads(1)
    text = experiments.run_one("sedky_rrdbnet", quick=True)
    assert "| channel SVD (" in text and "| CP (" in text and "| bicubic |" in text


def test_li_smoke():
    torch.set_num_threads(1)
    text = experiments.run_one("li_operating_points", quick=True)
    assert "| srresnet_x4 | Basis-64-14 | 18k (18k) |" in text

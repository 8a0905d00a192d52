"""Every zoo model builds, runs at a small input with the right output shape, and matches the parameter
counts its paper (or its authors' model table) states."""
import pytest
import torch
from torch import nn

from convfactor import models
from convfactor.measure.count import count, count_params

SMALL = {"sr": (3, 12, 10), "denoise": None, "classification": (3, 32, 32)}
FAST_KW = {"rrdbnet_x4": {"num_blocks": 1}, "rrdbnet_x2": {"num_blocks": 1}}
SPEC_NAMES = ["edsr_baseline_x2", "edsr_baseline_x4", "edsr_8_128_x2", "edsr_x2", "srresnet_x4", "srresnet_x2",
              "rrdbnet_x4", "dncnn", "dncnn_color", "resnet20", "resnet56", "vgg16_cifar", "densenet_bc_40_12",
              "blognet"]


def test_zoo_lists_the_issue_models_with_tasks():
    assert set(SPEC_NAMES) <= set(models.names())
    for name in SPEC_NAMES:
        info = models.info(name)
        assert info["task"] in ("sr", "denoise", "classification")
        assert ("scale" in info) == (info["task"] == "sr")


@pytest.mark.parametrize("name", [n for n in SPEC_NAMES + ["rrdbnet_x2"] if n != "edsr_x2"])
def test_forward_shape(name):
    info = models.info(name)
    model = models.get(name, **FAST_KW.get(name, {}))
    assert not model.training
    shape = SMALL[info["task"]] or (info["input_shape"][0], 12, 10)
    assert shape[0] == info["input_shape"][0]
    x = torch.rand(2, *shape)
    with torch.no_grad():
        y = model(x)
    if info["task"] == "sr":
        s = info["scale"]
        assert y.shape == (2, 3, 12 * s, 10 * s)
    elif info["task"] == "denoise":
        assert y.shape == x.shape
    else:
        assert y.shape == (2, 10)
    assert torch.isfinite(y).all()


def test_default_input_runs_for_a_cheap_model():
    m = models.get("resnet20")
    assert m(models.default_input("resnet20", batch=2)).shape == (2, 10)


# Parameter counts stated by the papers / the authors' model tables (rounded as they print them).
def _p(model):
    return count_params(model)


def test_edsr_params_match_paper():
    from convfactor.models.edsr import EDSR
    assert round(_p(models.get("edsr_baseline_x2")) / 1e6, 2) == 1.37     # EDSR-PyTorch model table
    assert round(_p(models.get("edsr_baseline_x4")) / 1e6, 1) == 1.5      # Lim et al. Table 1 (baseline)
    full = models.get("edsr_x2")
    assert round(_p(full) / 1e6, 1) == 40.7                               # EDSR-PyTorch model table
    assert all(b.res_scale == 0.1 for b in full.body[:-1])
    assert round(_p(EDSR(32, 256, 4, 0.1)) / 1e6, 0) == 43                # Lim et al. Table 1 (EDSR, x4)
    small = models.get("edsr_8_128_x2")
    assert len(small.body) == 9 and small.head.out_channels == 128


def test_cifar_resnet_params_match_paper():
    assert round(_p(models.get("resnet20")) / 1e6, 2) == 0.27              # He et al. Table 6
    assert round(_p(models.get("resnet56")) / 1e6, 2) == 0.85


def test_densenet_family_matches_paper_and_bc_40_12_counts():
    from convfactor.models.densenet import DenseNetCifar
    assert round(_p(DenseNetCifar(40, 12, bc=False)) / 1e6, 1) == 1.0      # Huang et al. Table 2
    assert round(_p(DenseNetCifar(100, 12, bc=True)) / 1e6, 1) == 0.8
    assert round(_p(DenseNetCifar(100, 24, bc=False)) / 1e6, 1) == 27.2
    # DenseNet-BC-40-12 has no row in the paper: count it by hand (6 bottleneck layers per block, k = 12).
    k, total, ch = 12, 3 * 24 * 9, 24
    for block in range(3):
        for _ in range(6):
            total += 2 * ch + ch * 4 * k + 2 * 4 * k + 4 * k * k * 9      # BN, 1x1, BN, 3x3
            ch += k
        if block < 2:
            total += 2 * ch + ch * (ch // 2)                              # BN, 1x1 transition
            ch //= 2
    total += 2 * ch + ch * 10 + 10                                        # final BN + FC
    assert _p(models.get("densenet_bc_40_12")) == total
    assert round(total / 1e6, 2) == 0.18


def test_rrdbnet_params_and_blocks():
    assert round(_p(models.get("rrdbnet_x4")) / 1e6, 1) == 16.7            # ESRGAN generator, 23 RRDBs
    m = models.get("rrdbnet_x4", num_blocks=4)
    assert len(m.body) == 4
    with pytest.raises(ValueError):
        models.get("rrdbnet_x4", num_blocks=0)


def test_vgg16_cifar_params_and_macs():
    m = models.get("vgg16_cifar")
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    fcs = [l for l in m.modules() if isinstance(l, nn.Linear)]
    assert len(convs) == 13 and len(fcs) == 1
    assert round(_p(m) / 1e6, 2) == 14.73
    # Li et al. (Pruning Filters, 2017) Table 2: 3.13e8 multiply-adds for CIFAR VGG-16.
    assert round(count(m, torch.zeros(1, 3, 32, 32))["macs"] / 1e8, 2) == 3.13


def test_dncnn_structure_and_residual():
    m = models.get("dncnn")
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    assert len(convs) == 17 and convs[0].in_channels == 1 and convs[-1].out_channels == 1
    assert _p(m) == (9 * 64 + 64) + 15 * (64 * 64 * 9 + 2 * 64) + 64 * 9
    with torch.no_grad():
        convs[-1].weight.zero_()
    x = torch.rand(1, 1, 16, 16)
    assert torch.equal(m(x), x)          # residual learning: output = input - predicted noise
    color = models.get("dncnn_color")
    convs = [l for l in color.modules() if isinstance(l, nn.Conv2d)]
    assert len(convs) == 20 and convs[0].in_channels == 3 and convs[-1].out_channels == 3


def test_srresnet_structure():
    m = models.get("srresnet_x4")
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    assert [c.kernel_size for c in (convs[0], convs[-1])] == [(9, 9), (9, 9)]
    assert sum(isinstance(l, nn.BatchNorm2d) for l in m.modules()) == 2 * 16 + 1
    assert sum(isinstance(l, nn.PixelShuffle) for l in m.modules()) == 2
    assert sum(isinstance(l, nn.PixelShuffle) for l in models.get("srresnet_x2").modules()) == 1


def test_blognet_matches_the_blogs_decomposition_figures():
    m = models.get("blognet")
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    assert len(convs) == 6
    assert convs[0].kernel_size == (5, 5) and convs[2].kernel_size == (5, 5)

    def spatial_svd_ratio(conv, rank):  # Tai et al.: (C*kh) x (kw*N) factored as C->K (kh x 1), K->N (1 x kw)
        c, n = conv.in_channels, conv.out_channels
        kh, kw = conv.kernel_size
        return (c * n * kh * kw) / (rank * (c * kh + n * kw))

    assert round(spatial_svd_ratio(convs[0], 10), 2) == 1.48
    assert round(spatial_svd_ratio(convs[2], 20), 2) == 16.0


def test_unknown_model_and_missing_weights():
    with pytest.raises(KeyError, match="unknown model"):
        models.get("no_such_model")
    with pytest.raises(KeyError):
        models.info("no_such_model")
    missing = [n for n in models.names() if n not in models.pretrained_names()]
    if missing:
        with pytest.raises(FileNotFoundError, match="no shipped weights"):
            models.get(missing[0], pretrained=True)


def test_training_stages_lay_each_stage_over_the_recipe():
    recipe = {"steps": 2000, "lr": 1e-3, "seed": 0, "stages": [{}, {"steps": 4000, "lr": 2e-4}]}
    stages = models.training_stages(recipe)
    assert stages == [{"steps": 2000, "lr": 1e-3, "seed": 0}, {"steps": 4000, "lr": 2e-4, "seed": 0}]
    assert models.training_stages({"steps": 5}) == [{"steps": 5}]
    assert recipe["stages"] == [{}, {"steps": 4000, "lr": 2e-4}]          # the recipe is not changed


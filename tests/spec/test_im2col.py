"""The im2col + GEMM convolution is exact against F.conv2d for every conv option."""
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

from convfactor.spec.im2col import Im2ColConv2d, conv2d_im2col, use_im2col
from strategies import conv2d_configs, input_for, make_layer, rel_err


@given(conv2d_configs())
def test_im2col_module_exact(cfg):
    layer = make_layer(cfg)
    x = input_for(layer)
    ref = layer(x)
    new = Im2ColConv2d.from_conv(layer)
    out = new(x)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert rel_err(out, ref) <= 1e-12
    assert new.weight is layer.weight and set(new.state_dict()) == set(layer.state_dict())


@given(conv2d_configs(allow_groups=True))
def test_functional_exact_unbatched_and_float32(cfg):
    layer = make_layer(cfg, dtype=torch.float32)
    x = input_for(layer, dtype=torch.float32)[0]                                  # (C, H, W)
    assert rel_err(Im2ColConv2d.from_conv(layer)(x).double(), layer(x).double()) <= 1e-5


def test_explicit_asymmetric_padding_matches_pad_then_conv():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 4, 9, 7, dtype=torch.float64), torch.randn(6, 2, 3, 2, dtype=torch.float64), None
    ref = F.conv2d(F.pad(x, (0, 2, 1, 0)), w, b, stride=(2, 1), dilation=(1, 2), groups=2)
    out = conv2d_im2col(x, w, b, stride=(2, 1), padding=((1, 0), (0, 2)), dilation=(1, 2), groups=2)
    assert rel_err(out, ref) <= 1e-12


def test_use_im2col_swaps_every_conv_and_keeps_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, groups=2, padding_mode="reflect", padding=1)),
                          nn.Flatten(), nn.Linear(8 * 4 * 8, 4)).double()
    x = torch.randn(2, 3, 8, 16, dtype=torch.float64)
    fast = use_im2col(model)
    assert sum(isinstance(m, Im2ColConv2d) for m in fast.modules()) == 2
    assert not any(isinstance(m, Im2ColConv2d) for m in model.modules())          # original untouched
    assert rel_err(fast(x), model(x)) <= 1e-12
    single = use_im2col(nn.Conv2d(2, 2, 3))
    assert isinstance(single, Im2ColConv2d)


def test_bad_input_raises():
    import pytest
    with pytest.raises(ValueError, match="channels"):
        conv2d_im2col(torch.randn(1, 3, 5, 5), torch.randn(4, 2, 3, 3))


def test_gradients_match_native():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, dtype=torch.float64)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    conv(x).square().sum().backward()
    ref = (x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    x.grad = conv.weight.grad = conv.bias.grad = None
    Im2ColConv2d.from_conv(conv)(x).square().sum().backward()
    for got, want in zip((x.grad, conv.weight.grad, conv.bias.grad), ref):
        assert rel_err(got, want) <= 1e-12

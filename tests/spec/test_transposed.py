"""ConvSpec describes ConvTranspose1d/2d/3d: sizes, MACs and pieces agree with torch itself."""
import pytest
import torch
from torch import nn

import convfactor
from convfactor.spec.convspec import ConvSpec, conv_of, is_conv, is_transposed, make_conv

GRID = [  # (kernel, stride, padding, output_padding, dilation, groups)
    (3, 1, 0, 0, 1, 1), (3, 2, 1, 1, 1, 1), (4, 2, 1, 0, 1, 2), ((3, 5), (2, 3), (1, 2), (1, 2), (1, 1), 1),
    ((2, 3), (3, 1), (0, 1), (2, 0), (1, 2), 2), (1, 2, 0, 1, 1, 1), (3, 2, 2, 1, 2, 1),
]


def _layer(dim, kernel, stride, padding, output_padding, dilation, groups, bias=True):
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]
    fit = (lambda v: v[:dim] if isinstance(v, tuple) else v) if dim < 2 else \
          (lambda v: (v + v[-1:])[:dim] if isinstance(v, tuple) else v)
    torch.manual_seed(0)
    return cls(4, 6, fit(kernel), stride=fit(stride), padding=fit(padding), output_padding=fit(output_padding),
               dilation=fit(dilation), groups=groups, bias=bias, dtype=torch.float64)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("cfg", GRID)
def test_spec_output_size_and_macs_match_torch(dim, cfg):
    layer = _layer(dim, *cfg)
    spec = ConvSpec.from_module(layer)
    assert spec.transposed and len(spec.output_padding) == dim and is_conv(layer) and is_transposed(layer)
    assert spec.weight_shape == tuple(layer.weight.shape)
    size = (5, 4, 3)[:dim]
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    y = layer(x)
    assert spec.output_size(size) == tuple(y.shape[2:])
    counted = convfactor.count(layer, x)
    assert counted["macs"] == 2 * spec.dense_macs(size)          # a batch of 2
    assert counted["params"] == spec.dense_params()


def test_plain_conv_spec_is_unchanged_and_old_recipes_load():
    spec = ConvSpec.from_module(nn.Conv2d(4, 6, 3, stride=2, padding=1))
    assert not spec.transposed and spec.output_padding == () and spec.weight_shape == (6, 4, 3, 3)
    old = spec.to_dict()
    del old["transposed"], old["output_padding"]                   # a recipe written before this change
    assert ConvSpec.from_dict(old) == spec
    t = ConvSpec.from_module(_layer(2, *GRID[3]))
    assert ConvSpec.from_dict(t.to_dict()) == t
    import json
    assert ConvSpec.from_dict(json.loads(json.dumps(t.to_dict()))) == t


@pytest.mark.parametrize("cfg", GRID)
def test_make_conv_carries_the_transposed_options_on_the_spatial_piece(cfg):
    layer = _layer(2, *cfg)
    spec = ConvSpec.from_module(layer)
    spatial = conv_of(make_conv(spec, 4, 6, axes=range(2), groups=layer.groups, bias=True, dtype=torch.float64))
    assert isinstance(spatial, nn.ConvTranspose2d)
    for attr in ("kernel_size", "stride", "padding", "output_padding", "dilation", "groups"):
        assert getattr(spatial, attr) == getattr(layer, attr), attr
    with torch.no_grad():
        spatial.weight.copy_(layer.weight)
        spatial.bias.copy_(layer.bias)
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    assert torch.allclose(spatial(x), layer(x), atol=1e-12)
    pointwise = make_conv(spec, 4, 6, groups=layer.groups)        # no axis: an ordinary 1x1 conv
    assert type(pointwise) is nn.Conv2d and pointwise.kernel_size == (1, 1) and pointwise.stride == (1, 1)

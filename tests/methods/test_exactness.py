"""Every available method reproduces the original conv at full rank, with every conv option."""
import pytest
import torch
from hypothesis import given
from torch import nn

import convfactor
from convfactor.spec.convspec import ConvSpec
from convfactor.methods import registry
from strategies import full_rank_or_none, conv2d_configs, input_for, make_layer, rel_err

CONV_METHODS = [m for m in registry.available() if registry.get(m).supported_dims and m not in ("tt", "linear_svd")]


def _full_rank_replacement(layer, method):
    ranks = full_rank_or_none(layer, method)
    return None if ranks is None else convfactor.factorize(layer, method, rank=ranks)


@pytest.mark.parametrize("method", CONV_METHODS)
@given(cfg=conv2d_configs())
def test_full_rank_reproduces_conv(method, cfg):
    layer = make_layer(cfg)
    new = _full_rank_replacement(layer, method)
    if new is None:
        return
    x = input_for(layer)
    with torch.no_grad():
        assert rel_err(new(x), layer(x)) <= 1e-6


@pytest.mark.parametrize("method", CONV_METHODS)
def test_dtype_device_preserved(method):
    layer = nn.Conv2d(8, 8, 3, padding=1).float()
    new = _full_rank_replacement(layer, method)
    for p in new.parameters():
        assert p.dtype == torch.float32 and p.device == layer.weight.device
    x = torch.randn(1, 8, 10, 10)
    assert rel_err(new(x).double(), layer(x).double()) < 1e-4


@pytest.mark.parametrize("method", CONV_METHODS)
def test_macs_ratio_target_is_met(method):
    layer = nn.Conv2d(32, 32, 3, padding=1, dtype=torch.float64)
    m = registry.get(method)
    spec = ConvSpec.from_module(layer)
    try:
        ranks = m.resolve_ranks(spec, layer.weight, macs_ratio=0.5, input_size=(16, 16))
    except ValueError:
        pytest.skip(f"{method} cannot reach 0.5 on this layer")
    cost = m.cost(spec, ranks, (16, 16))
    assert cost.macs <= 0.5 * spec.dense_macs((16, 16))


@pytest.mark.parametrize("method", CONV_METHODS)
def test_cost_formula_matches_flop_counter(method):
    layer = nn.Conv2d(12, 16, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=True)
    m = registry.get(method)
    spec = ConvSpec.from_module(layer)
    ranks = m.scaled_ranks(spec, 0.5)
    new = convfactor.factorize(layer, method, rank=ranks)
    x = torch.randn(1, 12, 20, 18)
    counted = convfactor.count(new, x)
    cost = m.cost(spec, ranks, (20, 18))
    assert counted["macs"] == cost.macs
    assert counted["params"] == cost.params

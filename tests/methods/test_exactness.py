"""Every available method reproduces the original conv at full rank, with every conv option, and
refuses exactly the layers it has a reason to refuse."""
import re

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import convfactor
from convfactor.spec.convspec import ConvSpec, UnsupportedLayer
from convfactor.methods import registry
from convfactor.methods.basis import optimal_splits
from strategies import (check_exact, conv2d_configs, conv2d_grid, full_rank_replacement, input_for, make_layer,
                        rel_err, refusal, shape_spec)

CONV_METHODS = [m for m in registry.available() if registry.get(m).supported_dims and m not in ("tt", "linear_svd")]

#: "nothing to factorize": the stated full rank is all ones (low-rank + sparse's sparse part reads 0)
NOTHING = r"full rank is \([01](, [01])*,?\), nothing to factorize"


def _expected_refusal(method: str, shape) -> str | None:
    """Why ``method`` must refuse a Conv2d of ``shape`` (a regex of its reason), from the method's own
    rank bound written out per channel group (C/g inputs, N/g outputs, kh x kw taps), or None."""
    groups, cin, cout, (kh, kw) = shape
    c, n, kv = cin // groups, cout // groups, kh * kw
    if method == "lowrank_sparse" and groups != 1:
        return "lowrank_sparse: groups=2 is not supported"
    if method == "sliced_svd" and c % 2:                          # the default 2 input slices
        return f"sliced_svd: 2 slices do not divide the {c} input channels per group"
    s = optimal_splits(shape_spec(shape))
    one = {"channel_svd": n == 1 or c * kv == 1,                  # one output, or one weight per output
           "sliced_svd": n == 1 or c // 2 * kv == 1,
           "spatial_svd": c * kh == 1 or n * kw == 1,             # the (C kh) x (N kw) matrix is a vector
           "tucker2": (c == 1 or n * kv == 1) and (n == 1 or c * kv == 1),   # both channel modes rank 1
           "cp": sum(d > 1 for d in (n, c, kh, kw)) <= 1,         # a tensor with one non-trivial mode
           "depthwise": n == 1 or kv == 1,                        # each input channel's (N/g, kv) slice
           "basis": cout * s == 1 or c // s * kv == 1,            # the (N s) x (C/(g s) kv) matrix of splits
           "lowrank_sparse": n == 1 or c * kv == 1}[method]
    return f"{method}: {NOTHING}" if one else None


@pytest.mark.parametrize("method", CONV_METHODS)
@given(data=st.data())
def test_full_rank_reproduces_conv(method, data):
    layer = make_layer(data.draw(conv2d_configs(method=method)))
    check_exact(layer, method, input_for(layer), 1e-6)


@pytest.mark.parametrize("method", CONV_METHODS)
def test_refuses_exactly_the_layers_with_a_reason(method):
    """Over every shape the property test above could draw: the method refuses a layer exactly when its
    rank bound leaves nothing to factorize (or an option does not fit), and says so, also through factorize."""
    wrong, refused = [], 0
    for shape in conv2d_grid():
        expected, got = _expected_refusal(method, shape), refusal(method, shape)
        if (expected is None) != (got is None) or (expected is not None and not re.fullmatch(expected, got)):
            wrong.append(f"{shape}: expected {expected!r}, got {got!r}")
        if got is not None and expected is not None:
            refused += 1
            groups, cin, cout, kernel = shape
            with pytest.raises(UnsupportedLayer, match=expected):
                convfactor.factorize(nn.Conv2d(cin, cout, kernel, groups=groups), method, rank=1)
    assert not wrong, f"{len(wrong)} shapes refused or taken wrongly, e.g. {wrong[:5]}"
    assert refused, f"{method} refuses no shape of the grid: the check above saw no refusal"


@pytest.mark.parametrize("method", CONV_METHODS)
def test_dtype_device_preserved(method):
    layer = nn.Conv2d(8, 8, 3, padding=1).float()
    new = full_rank_replacement(layer, method)
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

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import convfactor
from convfactor.spec.convspec import ConvSpec
from convfactor.methods import registry


@given(n=st.integers(2, 12), c=st.integers(1, 6), k=st.integers(1, 3), r=st.integers(1, 12),
       groups=st.sampled_from([1, 2]))
def test_truncation_error_equals_discarded_energy(n, c, k, r, groups):
    layer = nn.Conv2d(c * groups, n * groups, k, groups=groups, dtype=torch.float64)
    m = registry.get("channel_svd")
    spec = ConvSpec.from_module(layer)
    r = min(r, m.full_rank(spec)[0])
    factors = m.factorize(layer.weight.detach(), spec, (r,))
    approx = m.reconstruct(factors, spec)
    s = m.spectra(layer.weight.detach(), spec)[0]          # (groups, full)
    discarded = s[:, r:].pow(2).sum()
    assert torch.allclose((approx - layer.weight).pow(2).sum(), discarded, rtol=1e-9, atol=1e-12)


def test_energy_target_keeps_requested_energy():
    layer = nn.Conv2d(16, 32, 3, dtype=torch.float64)
    new = convfactor.factorize(layer, "channel_svd", energy=0.9)
    m = registry.get("channel_svd")
    s = m.spectra(layer.weight.detach(), ConvSpec.from_module(layer))[0][0]
    r = new.ranks[0]
    frac = s[:r].pow(2).sum() / s.pow(2).sum()
    assert frac >= 0.9 and (r == 1 or s[: r - 1].pow(2).sum() / s.pow(2).sum() < 0.9)


def test_linear_svd_on_linear_and_pointwise():
    lin = nn.Linear(20, 12, dtype=torch.float64)
    new = convfactor.factorize(lin, "linear_svd", rank=12)
    x = torch.randn(3, 5, 20, dtype=torch.float64)
    assert torch.allclose(new(x), lin(x), atol=1e-10)
    conv = nn.Conv2d(20, 12, 1, stride=2, dtype=torch.float64)
    new = convfactor.factorize(conv, "linear_svd", rank=12)
    x = torch.randn(1, 20, 9, 9, dtype=torch.float64)
    assert torch.allclose(new(x), conv(x), atol=1e-10)
    with pytest.raises(convfactor.UnsupportedLayer, match="not 1x1"):
        convfactor.factorize(nn.Conv2d(4, 4, 3), "linear_svd", rank=2)


@pytest.mark.parametrize("bad", [0, -1, 17, 2.5, "3", (2, 2)])
def test_bad_rank_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="rank"):
        convfactor.factorize(nn.Conv2d(16, 16, 3), "channel_svd", rank=bad)


@pytest.mark.parametrize("kw", [{"macs_ratio": 0}, {"macs_ratio": 1.5}, {"energy": 0}, {"energy": 2.0},
                                {}, {"rank": 2, "energy": 0.5}])
def test_bad_target_is_a_clear_error(kw):
    with pytest.raises(ValueError):
        convfactor.factorize(nn.Conv2d(16, 16, 3), "channel_svd", **kw)


def test_nan_weights_refused():
    layer = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        convfactor.factorize(layer, "channel_svd", rank=2)


def test_unknown_method():
    with pytest.raises(KeyError, match="unknown method"):
        convfactor.factorize(nn.Conv2d(4, 4, 3), "nope", rank=2)


def test_transposed_conv_is_unsupported_by_methods_without_it():
    # channel_svd and tucker2 support ConvTranspose (tests/methods/test_transposed_methods.py); cp does not
    with pytest.raises(convfactor.UnsupportedLayer, match="ConvTranspose2d is not supported"):
        convfactor.factorize(nn.ConvTranspose2d(4, 4, 3), "cp", rank=2)

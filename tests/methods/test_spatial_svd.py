"""Spatial SVD (Tai et al. 2016): optimality of the closed form, rank checks, built module = factors."""
import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import convfactor
from convfactor.spec.convspec import ConvSpec, conv_of
from convfactor.methods import registry
from strategies import input_for, rel_err

M = registry.get("spatial_svd")


def tai_matrix(w: torch.Tensor, groups: int, g: int) -> torch.Tensor:
    """Group g's (C kh) x (kw N) matrix of Theorem 1, built index by index (independently of the module)."""
    ng = w.shape[0] // groups
    wg = w[g * ng:(g + 1) * ng]                      # (n, c, i, j)
    n, c, kh, kw = wg.shape
    m = torch.empty(c * kh, kw * n, dtype=w.dtype)
    for ci in range(c):
        for i in range(kh):
            for j in range(kw):
                m[ci * kh + i, j * n:(j + 1) * n] = wg[:, ci, i, j]
    return m


def _layer(n, c, kh, kw, groups, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(c * groups, n * groups, (kh, kw), groups=groups, dtype=torch.float64)


@given(n=st.integers(1, 6), c=st.integers(1, 5), kh=st.integers(1, 4), kw=st.integers(1, 4),
       groups=st.sampled_from([1, 2, 3]), r=st.integers(1, 24))
def test_truncation_error_equals_discarded_energy(n, c, kh, kw, groups, r):
    layer = _layer(n, c, kh, kw, groups)
    spec = ConvSpec.from_module(layer)
    w = layer.weight.detach()
    r = min(r, M.full_rank(spec)[0])
    approx = M.reconstruct(M.factorize(w, spec, (r,)), spec)
    discarded = sum(torch.linalg.svdvals(tai_matrix(w, groups, g))[r:].pow(2).sum() for g in range(groups))
    err = (approx - w).pow(2).sum()
    assert abs(err - discarded) <= 1e-9 * w.pow(2).sum() + 1e-12


@given(n=st.integers(1, 6), c=st.integers(1, 5), kh=st.integers(1, 3), kw=st.integers(1, 3),
       groups=st.sampled_from([1, 2]))
def test_spectra_are_the_singular_values_of_tai_matrix(n, c, kh, kw, groups):
    layer = _layer(n, c, kh, kw, groups, seed=1)
    spec = ConvSpec.from_module(layer)
    w = layer.weight.detach()
    (s,) = M.spectra(w, spec)
    assert s.shape == (groups, M.full_rank(spec)[0])
    for g in range(groups):
        ref = torch.linalg.svdvals(tai_matrix(w, groups, g))
        assert torch.allclose(s[g].pow(2), ref.pow(2), atol=1e-12 * ref[0].item() ** 2 + 1e-15)


def test_pieces_carry_their_own_axis():
    layer = nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode="reflect")
    new = convfactor.factorize(layer, "spatial_svd", rank=4)
    v, h = new
    assert v.kernel_size == (3, 1) and v.stride == (2, 1) and v.padding == (1, 0) and v.dilation == (1, 1)
    assert h.kernel_size == (1, 5) and h.stride == (1, 1) and h.padding == (0, 2) and h.dilation == (1, 2)
    assert v.padding_mode == h.padding_mode == "reflect"
    assert v.bias is None and h.bias is not None and new.ranks == (4,)


@pytest.mark.parametrize("cfg", [dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
                                 dict(padding="same", dilation=(1, 2)),
                                 dict(stride=2, padding=1, padding_mode="circular", groups=2)])
def test_truncated_module_computes_the_reconstructed_kernel(cfg):
    layer = nn.Conv2d(4, 6, (4, 3), dtype=torch.float64, **cfg)
    spec = ConvSpec.from_module(layer)
    new = convfactor.factorize(layer, "spatial_svd", rank=3)
    dense = M.reconstruct({k: conv_of(p).weight.detach() for k, p in zip(M.factor_names, new)}, spec)
    ref = nn.Conv2d(4, 6, (4, 3), dtype=torch.float64, **cfg)
    with torch.no_grad():
        ref.weight.copy_(dense)
        ref.bias.copy_(layer.bias)
    x = input_for(layer)
    with torch.no_grad():
        assert rel_err(new(x), ref(x)) < 1e-12
        assert rel_err(new(x), layer(x)) > 1e-3           # really truncated


def test_split_is_balanced():
    layer = _layer(8, 6, 3, 3, 1)
    spec = ConvSpec.from_module(layer)
    f = M.factorize(layer.weight.detach(), spec, (5,))
    v = f["vertical"].reshape(5, -1).norm(dim=1)
    h = f["horizontal"].transpose(0, 1).reshape(5, -1).norm(dim=1)
    s = torch.linalg.svdvals(tai_matrix(layer.weight.detach(), 1, 0))[:5]
    assert torch.allclose(v, s.sqrt(), rtol=1e-9) and torch.allclose(h, s.sqrt(), rtol=1e-9)


def test_energy_target_keeps_requested_energy():
    layer = _layer(16, 12, 3, 3, 1, seed=3)
    new = convfactor.factorize(layer, "spatial_svd", energy=0.8)
    s2 = torch.linalg.svdvals(tai_matrix(layer.weight.detach(), 1, 0)).pow(2)
    frac = s2.cumsum(0) / s2.sum()
    (r,) = new.ranks
    assert frac[r - 1] >= 0.8 and (r == 1 or frac[r - 2] < 0.8)


def test_cost_formula():
    layer = nn.Conv2d(12, 16, (3, 5), stride=(2, 3), padding=(1, 0), groups=2)
    spec = ConvSpec.from_module(layer)
    # vertical: 2 groups x 4 filters over 6 ch x 3 taps on a 10x17 map; horizontal: 16 x 4 x 5 on 10x5
    assert M.cost(spec, (4,), (20, 17)).macs == 10 * 17 * 2 * 4 * 6 * 3 + 10 * 5 * 16 * 4 * 5
    assert M.cost(spec, (4,), (20, 17)).params == 2 * 4 * 6 * 3 + 16 * 4 * 5 + 16


@pytest.mark.parametrize("bad", [0, -2, 25, 2.0, "4", (3, 3)])
def test_bad_rank_is_a_clear_error(bad):
    layer = nn.Conv2d(8, 8, 3)            # full rank min(8*3, 3*8) = 24
    with pytest.raises(ValueError, match="rank"):
        convfactor.factorize(layer, "spatial_svd", rank=bad)


@pytest.mark.parametrize("layer", [nn.Conv1d(4, 4, 3), nn.Conv3d(4, 4, 3), nn.Linear(4, 4)])
def test_only_conv2d(layer):
    with pytest.raises(convfactor.UnsupportedLayer, match="spatial_svd"):
        convfactor.factorize(layer, "spatial_svd", rank=2)


def test_compress_reports_the_weight_error_of_the_built_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    _, report = convfactor.compress(model, [{"op_names": ["2"], "method": "spatial_svd", "rank": 4}],
                                    torch.randn(1, 3, 8, 8))
    (layer,) = report.compressed
    spec = ConvSpec.from_module(model[2])
    w = model[2].weight.detach().double()
    expected = (M.reconstruct(M.factorize(w, spec, (4,)), spec) - w).norm() / w.norm()
    assert layer.weight_error == pytest.approx(expected.item(), rel=1e-5)

"""Data-aware (response) fitting (issue 7, item 2)."""
import copy

import pytest
import torch
from torch import nn

import convfactor
from convfactor.spec.convspec import ConvSpec, UnsupportedLayer
from convfactor.methods import data_aware as da
from convfactor.methods import registry
from convfactor.methods.channel_svd import ChannelSVD
from strategies import rel_err

C = 12


def _mixing(c=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    # strongly correlated input channels: the setting where response fitting matters
    return torch.randn(c, c, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, c, dtype=torch.float64))


def _data(n, seed, c=C, size=10):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, size, size, generator=g, dtype=torch.float64)
    return torch.einsum("dc,bchw->bdhw", _mixing(c), z) + 0.3


def _layer(cout=16, k=3, groups=1, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(C, cout, k, padding=k // 2, groups=groups, bias=bias, dtype=torch.float64)


def _err(new, layer, x, relu=False):
    with torch.no_grad():
        a, b = new(x), layer(x)
        if relu:
            a, b = a.clamp(min=0), b.clamp(min=0)
        return rel_err(a, b)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_is_exact(groups, bias):
    layer = _layer(groups=groups, bias=bias)
    full = ChannelSVD().full_rank(ConvSpec.from_module(layer))
    new = convfactor.factorize(layer, "channel_svd", rank=full, calibration=_data(3, 1))
    assert _err(new, layer, _data(2, 2)) <= 1e-9


@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_error_is_the_discarded_response_energy(bias):
    """Zhang et al. sec. 3.1: the optimal rank-r response error is the tail of the response spectrum."""
    layer, x, r = _layer(bias=bias), _data(4, 1), 4
    new = convfactor.factorize(layer, "channel_svd", rank=r, calibration=x)
    with torch.no_grad():
        y = layer(x).movedim(1, -1).reshape(-1, 16)
        got = (new(x).movedim(1, -1).reshape(-1, 16) - y).pow(2).sum().item()
    y0 = y - layer.bias if bias else y
    if bias:
        y0 = y0 - y0.mean(0)
    eig = torch.linalg.eigvalsh(y0.T @ y0)            # ascending; independent of the fit's code path
    assert got == pytest.approx(eig[:-r].sum().item(), rel=1e-8)
    weight_only = convfactor.factorize(layer, "channel_svd", rank=r)
    assert _err(new, layer, x) < 0.9 * _err(weight_only, layer, x)


def test_generalizes_to_held_out_inputs():
    layer = _layer()
    w = convfactor.factorize(layer, "channel_svd", rank=4)
    d = convfactor.factorize(layer, "channel_svd", rank=4, calibration=[_data(3, 1), _data(3, 2)])
    test = _data(4, 9)
    assert _err(d, layer, test) < 0.8 * _err(w, layer, test)


def test_linear_svd_and_lists_of_row_batches():
    torch.manual_seed(0)
    layer = nn.Linear(C, 10, dtype=torch.float64)
    rows = _data(4, 1).movedim(1, -1).reshape(-1, C)
    w = convfactor.factorize(layer, "linear_svd", rank=3)
    d = convfactor.factorize(layer, "linear_svd", rank=3, calibration=list(rows.split(100)))
    assert isinstance(d[-1], nn.Linear)
    assert _err(d, layer, rows) < 0.8 * _err(w, layer, rows)


def test_relu_variant_never_worse_on_the_relu_objective():
    layer, x = _layer(), _data(4, 1)
    lin = convfactor.factorize(layer, "channel_svd", rank=3, calibration=x)
    rel = convfactor.factorize(layer, "channel_svd", rank=3, calibration=x, relu=True)
    assert _err(rel, layer, x, relu=True) <= _err(lin, layer, x, relu=True) + 1e-12
    assert _err(rel, layer, x, relu=True) < 0.97 * _err(lin, layer, x, relu=True)   # and it helps here


def test_relu_z_step_is_the_elementwise_minimizer():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(200, generator=g, dtype=torch.float64).clamp(min=0)
    y_hat = torch.randn(200, generator=g, dtype=torch.float64)
    grid = torch.linspace(-4, 4, 8001, dtype=torch.float64)
    for lam in (0.01, 0.3, 1.0):
        z = da.relu_z_step(t, y_hat, lam)
        cost = lambda zz: (t[:, None] - zz.clamp(min=0)) ** 2 + lam * (zz - y_hat[:, None]) ** 2
        best = cost(grid[None, :]).min(1).values
        assert (cost(z[:, None])[:, 0] <= best + 1e-9).all()


class _WeightOnlySVD(ChannelSVD):
    """channel_svd forced down the generic path (last-piece least squares)."""

    name = "test_generic_svd"

    def factorize(self, weight, spec, ranks, **options):
        return super().factorize(weight, spec, ranks, **options)


def test_generic_refit_and_alternation_approach_the_closed_form():
    layer, x = _layer(), _data(4, 1)
    method = _WeightOnlySVD()
    w = convfactor.factorize(layer, method, rank=4)
    last = convfactor.factorize(layer, method, rank=4, calibration=x)
    alt = convfactor.factorize(layer, method, rank=4, calibration=x, alternate=30)
    closed = convfactor.factorize(layer, "channel_svd", rank=4, calibration=x)
    e_w, e_last, e_alt, e_closed = (_err(m, layer, x) for m in (w, last, alt, closed))
    assert e_last < e_w
    assert e_closed - 1e-9 <= e_alt <= e_last + 1e-12
    assert e_alt <= 1.05 * e_closed


def test_refit_generic_conv_chain_with_padding_modes_and_stride():
    """A hand-built chain (1x1, kxk, 1x1) whose middle carries the options: the last piece becomes the LS optimum."""
    torch.manual_seed(0)
    layer = nn.Conv2d(C, 8, 3, stride=2, padding=1, padding_mode="reflect", dtype=torch.float64)
    spec = ConvSpec.from_module(layer)
    chain = convfactor.methods.base.Factorized(
        nn.Conv2d(C, C, 1, bias=False, dtype=torch.float64),
        nn.Conv2d(C, C, 3, stride=2, padding=1, padding_mode="reflect", bias=False, dtype=torch.float64),
        nn.Conv2d(C, 8, 1, dtype=torch.float64), method="x", spec=spec, ranks=(C,))
    with torch.no_grad():
        chain[0].weight.copy_(torch.eye(C, dtype=torch.float64).reshape(C, C, 1, 1))
    x = _data(3, 1)
    before = _err(chain, layer, x)
    da.refit_last(chain, layer, [x])
    after = _err(chain, layer, x)
    assert after < before
    # the refit is the least-squares optimum: perturbing the last weight cannot help
    for _ in range(3):
        probe = copy.deepcopy(chain)
        with torch.no_grad():
            probe[2].weight.add_(1e-3 * torch.randn_like(probe[2].weight))
        assert _err(probe, layer, x) >= after


def _available_chain_methods():
    present = registry.available()
    return [name for name in ["spatial_svd", "tucker2", "cp", "depthwise", "basis"] if name in present]


@pytest.mark.parametrize("method", _available_chain_methods())
def test_every_chain_method_improves_on_calibration_data(method):
    layer, x = _layer(seed=1), _data(3, 1)
    m = registry.get(method)
    spec = ConvSpec.from_module(layer)
    try:
        m.check(spec)
        ranks = m.resolve_ranks(spec, layer.weight, macs_ratio=0.4, input_size=(10, 10))
    except (UnsupportedLayer, ValueError):
        pytest.skip(f"{method} does not apply")
    w = convfactor.factorize(layer, method, rank=ranks)
    try:
        d = convfactor.factorize(layer, method, rank=ranks, calibration=x)
    except UnsupportedLayer as exc:
        pytest.skip(str(exc))
    assert _err(d, layer, x) <= _err(w, layer, x) + 1e-9
    assert d.ranks == w.ranks
    assert convfactor.count(d, x)["macs"] == convfactor.count(w, x)["macs"]


def test_dtype_device_and_bad_calibration():
    layer = nn.Conv2d(C, 8, 3, padding=1)
    x = _data(2, 1).float()
    new = convfactor.factorize(layer, "channel_svd", rank=3, calibration=x)
    assert all(p.dtype == torch.float32 for p in new.parameters())
    with pytest.raises(ValueError, match="calibration inputs must be"):
        convfactor.factorize(layer, "channel_svd", rank=3, calibration=torch.randn(2, C + 1, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        convfactor.factorize(layer, "channel_svd", rank=3, calibration=torch.full((1, C, 8, 8), float("nan")))
    with pytest.raises(UnsupportedLayer):
        convfactor.factorize(nn.Linear(16, 16), "tt", rank=2, calibration=torch.randn(5, 16))


def test_compress_with_data_aware_rule_lowers_output_error():
    model = convfactor.models.get("resnet20").eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    x = torch.randn(2, 3, 32, 32, generator=g)
    rule = {"op_names": ["layer2.*", "layer3.*"], "op_types": ["Conv2d"], "method": "channel_svd", "macs_ratio": 0.4}
    plain, rep_w = convfactor.compress(model, [rule], x)
    aware, rep_d = convfactor.compress(model, [dict(rule, data_aware=True)], x, calibration=calib)
    with pytest.raises(ValueError, match="calibration"):
        convfactor.compress(model, [dict(rule, data_aware=True)], x)
    assert [L.ranks for L in rep_w.layers] == [L.ranks for L in rep_d.layers]
    mean = lambda rep: sum(L.output_error for L in rep.compressed) / len(rep.compressed)
    assert mean(rep_d) < 0.9 * mean(rep_w)
    with torch.no_grad():
        assert rel_err(aware(x), model(x)) < rel_err(plain(x), model(x))

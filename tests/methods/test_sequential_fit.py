"""The asymmetric (sequential) response fit (issue 22, part 4): a layer fitted on the inputs the
compressed layers before it produce, to the responses the original network gives it."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import convfactor
from convfactor.methods import data_aware as da
from strategies import rel_err

C = 10


def _inputs(n, seed, size=9):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(C, C, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, C, dtype=torch.float64))
    return torch.einsum("dc,bchw->bdhw", mix, torch.randn(n, C, size, size, generator=g, dtype=torch.float64)) + 0.2


def _perturbed(x, seed=5, scale=0.3):
    """What a compressed prefix would hand the layer: its inputs with their channels slightly mixed (the
    same map for every sample, as a low-rank layer before it would do) and a little noise."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(C, dtype=x.dtype) + scale * torch.randn(C, C, generator=g, dtype=x.dtype) / C ** 0.5
    return torch.einsum("dc,bchw->bdhw", mix, x) + 0.01 * x.std() * torch.randn(x.shape, generator=g, dtype=x.dtype)


def _layer(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Conv2d(C, 12, 3, padding=1, bias=bias, dtype=torch.float64)


def _err_to_original(new, layer, x_hat, x):
    with torch.no_grad():
        return rel_err(new(x_hat), layer(x))


def test_reduced_rank_regression_matches_an_independent_solution():
    """No bias, negligible ridge: the fit is argmin ||T - Y_hat M^T|| over rank-r M, which numpy gives
    as the least-squares map projected on the top right singular vectors of its fitted values."""
    g = torch.Generator().manual_seed(3)
    n, q, r, p = 8, 6, 3, 400
    w = torch.randn(n, q, generator=g, dtype=torch.float64)
    x_hat = torch.randn(p, q, generator=g, dtype=torch.float64)
    x = x_hat + 0.2 * torch.randn(p, q, generator=g, dtype=torch.float64)
    y_hat, y = x_hat @ w.T, x @ w.T
    factors = da.fit_response_svd(w.reshape(n, q, 1, 1), None, y_hat, r, ridge=0.0, targets=y)
    m = factors["second"] @ factors["first"].reshape(r, q)              # (n, q): the compressed weight
    got = np.linalg.norm(y.numpy() - x_hat.numpy() @ m.numpy().T)
    m_ls = np.linalg.lstsq(y_hat.numpy(), y.numpy(), rcond=None)[0]      # (n, n): y ~ y_hat m_ls
    _, _, vt = np.linalg.svd(y_hat.numpy() @ m_ls, full_matrices=False)
    best = y_hat.numpy() @ m_ls @ vt[:r].T @ vt[:r]
    want = np.linalg.norm(y.numpy() - best)
    assert got == pytest.approx(want, rel=1e-7)


@pytest.mark.parametrize("method,rank", [("channel_svd", 4), ("tucker2", (4, 4)), ("spatial_svd", 6)])
def test_targets_equal_to_the_inputs_give_the_symmetric_fit(method, rank):
    layer, x = _layer(), _inputs(4, 1)
    plain = convfactor.factorize(layer, method, rank=rank, calibration=x, relu=False)
    same = da.factorize_data_aware(layer, plain.method if hasattr(plain, "method") and not isinstance(plain.method, str)
                                   else convfactor.methods.registry.get(method),
                                   convfactor.spec.convspec.ConvSpec.from_module(layer), plain.ranks, x,
                                   da.DataAwareSettings(relu=False), targets=x.clone())
    probe = _inputs(2, 9)
    with torch.no_grad():
        assert rel_err(same(probe), plain(probe)) < 1e-6


@pytest.mark.parametrize("method,rank", [("channel_svd", 4), ("tucker2", (4, 4)), ("spatial_svd", 6)])
@pytest.mark.parametrize("relu", [False, True])
def test_asymmetric_fit_reproduces_the_original_better(method, rank, relu):
    """Fitted on what the layer will see, to what the original produced: on those inputs, closer to the
    original's responses than the fit that ignores the upstream error (it solves that least squares)."""
    layer = _layer()
    x = _inputs(24, 1)
    x_hat = _perturbed(x)
    settings = da.DataAwareSettings(relu=relu, holdout=0.0)
    spec = convfactor.spec.convspec.ConvSpec.from_module(layer)
    m = convfactor.methods.registry.get(method)
    ranks = m.resolve_ranks(spec, layer.weight.detach(), rank=rank)
    symmetric = da.factorize_data_aware(layer, m, spec, ranks, x_hat, settings)
    asym = da.factorize_data_aware(layer, m, spec, ranks, x_hat, settings, targets=x)
    f = (lambda t: t.clamp(min=0)) if relu else (lambda t: t)
    with torch.no_grad():
        assert rel_err(f(asym(x_hat)), f(layer(x))) < rel_err(f(symmetric(x_hat)), f(layer(x)))


def test_full_rank_with_upstream_error_is_fitted_not_returned_exact():
    layer, x = _layer(), _inputs(6, 1)
    x_hat = _perturbed(x)
    spec = convfactor.spec.convspec.ConvSpec.from_module(layer)
    m = convfactor.methods.registry.get("channel_svd")
    full = m.full_rank(spec)
    fitted = da.factorize_data_aware(layer, m, spec, full, x_hat, da.DataAwareSettings(relu=False), targets=x)
    assert _err_to_original(fitted, layer, x_hat, x) < _err_to_original(layer, layer, x_hat, x)


def test_targets_must_match_the_calibration_batches():
    layer, x = _layer(), _inputs(4, 1)
    spec = convfactor.spec.convspec.ConvSpec.from_module(layer)
    m = convfactor.methods.registry.get("channel_svd")
    with pytest.raises(ValueError, match="targets must match"):
        da.factorize_data_aware(layer, m, spec, (4,), x, targets=x[:3])


@pytest.mark.parametrize("bad", [dict(relu="maybe"), dict(sequential=1), dict(sequential="yes")])
def test_settings_are_checked(bad):
    with pytest.raises(ValueError):
        da.DataAwareSettings(**bad)


def test_auto_relu_is_linear_for_a_lone_layer():
    layer, x = _layer(), _inputs(4, 1)
    auto = convfactor.factorize(layer, "channel_svd", rank=4, calibration=x)
    linear = convfactor.factorize(layer, "channel_svd", rank=4, calibration=x, relu=False)
    for a, b in zip(auto.parameters(), linear.parameters()):
        assert torch.equal(a, b)

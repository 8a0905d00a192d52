"""Low-rank + sparse by ADMM (issue 7, item 3)."""
import pytest
import torch
from torch import nn

import convfactor
from convfactor.spec.convspec import ConvSpec, UnsupportedLayer
from convfactor.methods import lowrank_sparse as ls
from convfactor.methods import registry
from strategies import rel_err

LS = registry.get("lowrank_sparse")
N, C, K = 20, 12, 9          # out channels, in channels, 3x3 kernel
PLANTED_RANK, PLANTED_CHANNELS = 3, [1, 6, 10]


def _planted(seed=0):
    g = torch.Generator().manual_seed(seed)
    b0 = torch.randn(N, PLANTED_RANK, generator=g, dtype=torch.float64) @ torch.randn(
        PLANTED_RANK, C * K, generator=g, dtype=torch.float64)
    a0 = torch.zeros(N, C * K, dtype=torch.float64)
    for c in PLANTED_CHANNELS:
        a0[:, c * K:(c + 1) * K] = torch.randn(N, K, generator=g, dtype=torch.float64)
    return a0, b0


def _objective(w, gram, a, b, l1, l2):
    r = w - a - b
    return (0.5 * torch.trace(r @ gram @ r.T) + l1 * a.reshape(N, C, K).pow(2).sum((0, 2)).sqrt().sum()
            + l2 * torch.linalg.svdvals(b).sum()).item()


def _off_support(m):
    keep = torch.ones(C, dtype=torch.bool)
    keep[PLANTED_CHANNELS] = False
    return m.reshape(N, C, K)[:, keep]


def test_prox_operators_closed_forms():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(8, 12, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(m)
    assert torch.allclose(torch.linalg.svdvals(ls.svt(m, 1.0)), (s - 1).clamp(min=0), atol=1e-10)
    shrunk = ls.group_shrink(m, 4, 1.5)
    before = m.reshape(8, 4, 3).pow(2).sum((0, 2)).sqrt()
    after = shrunk.reshape(8, 4, 3).pow(2).sum((0, 2)).sqrt()
    assert torch.allclose(after, (before - 1.5).clamp(min=0), atol=1e-10)
    # each prox minimizes its objective: random perturbations never do better
    for prox, pen, tau in ((lambda x: ls.svt(x, 1.0), lambda x: torch.linalg.svdvals(x).sum(), 1.0),
                           (lambda x: ls.group_shrink(x, 4, 1.5),
                            lambda x: x.reshape(8, 4, 3).pow(2).sum((0, 2)).sqrt().sum(), 1.5)):
        p = prox(m)
        f = lambda x: (0.5 * (x - m).pow(2).sum() + tau * pen(x)).item()
        for _ in range(10):
            assert f(p) <= f(p + 1e-3 * torch.randn(p.shape, generator=g, dtype=torch.float64)) + 1e-12


def test_admm_recovers_planted_structure_weight_only():
    a0, b0 = _planted()
    w = a0 + b0
    gram = torch.eye(C * K, dtype=torch.float64)
    scale = torch.linalg.matrix_norm(w, ord=2).item()
    a, b = ls.admm_lowrank_sparse(w, gram, C, 0.05 * scale, 0.05 * scale, iters=200)
    norms = a.reshape(N, C, K).pow(2).sum((0, 2)).sqrt()
    assert set(torch.nonzero(norms > 1e-6 * norms.max()).flatten().tolist()) == set(PLANTED_CHANNELS)
    sv = torch.linalg.svdvals(b)
    assert (sv[PLANTED_RANK:] < 1e-6 * sv[0]).all() and sv[PLANTED_RANK - 1] > 1e-2 * sv[0]
    # the ADMM point beats the pure low-rank optimum (A = 0, B = SVT(W)) of the same objective
    l1 = l2 = 0.05 * scale
    assert _objective(w, gram, a, b, l1, l2) <= _objective(w, gram, torch.zeros_like(w), ls.svt(w, l2), l1, l2)
    # enforcing the ranks and refitting recovers W exactly, and B off the support
    left, right, sparse, index = ls.refit_structure(w, gram, C, a, PLANTED_RANK, len(PLANTED_CHANNELS))
    assert index.tolist() == PLANTED_CHANNELS
    approx = left @ right
    approx.reshape(N, C, K)[:, index] += sparse.reshape(N, -1, K)
    assert rel_err(approx, w) < 1e-8
    assert rel_err(_off_support(left @ right), _off_support(b0)) < 1e-8


def test_response_reconstruction_recovers_planted_structure_with_correlated_inputs():
    a0, b0 = _planted(1)
    layer = nn.Conv2d(C, N, 3, padding=1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_((a0 + b0).reshape(N, C, 3, 3))
    g = torch.Generator().manual_seed(2)
    mix = torch.randn(C, C, generator=g, dtype=torch.float64) + 2 * torch.eye(C, dtype=torch.float64)
    x = torch.einsum("dc,bchw->bdhw", mix, torch.randn(6, C, 10, 10, generator=g, dtype=torch.float64))
    new = convfactor.factorize(layer, "lowrank_sparse", rank=(PLANTED_RANK, len(PLANTED_CHANNELS)), calibration=x)
    assert new[0].index.tolist() == PLANTED_CHANNELS
    with torch.no_grad():
        assert rel_err(new(x), layer(x)) < 1e-6
        other = torch.einsum("dc,bchw->bdhw", mix, torch.randn(2, C, 10, 10, generator=g, dtype=torch.float64))
        assert rel_err(new(other), layer(other)) < 1e-6
    # pure low rank at more MACs cannot do that
    svd = convfactor.factorize(layer, "channel_svd", rank=PLANTED_RANK + 3, calibration=x)
    with torch.no_grad():
        assert rel_err(svd(x), layer(x)) > 1e-2


def test_refit_never_increases_the_response_error():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(N, C * K, generator=g, dtype=torch.float64)
    x = torch.randn(C * K, 400, generator=g, dtype=torch.float64)
    gram = x @ x.T / 400
    a, _ = ls.admm_lowrank_sparse(w, gram, C, 0.1, 0.1, iters=50)
    errs = []
    for iters in (0, 1, 3, 10):
        left, right, sparse, index = ls.refit_structure(w, gram, C, a, 4, 2, iters=iters)
        approx = left @ right
        approx.reshape(N, C, K)[:, index] += sparse.reshape(N, -1, K)
        errs.append(((w - approx) @ x).norm().item())
    assert all(e2 <= e1 * (1 + 1e-10) for e1, e2 in zip(errs, errs[1:]))


@pytest.mark.parametrize("layer", [nn.Conv2d(12, 16, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
                                   nn.Conv1d(12, 16, 3, padding=1, padding_mode="circular"),
                                   nn.Linear(30, 20)])
def test_cost_matches_counter_and_save_load(layer, tmp_path):
    spec = ConvSpec.from_module(layer)
    ranks = (4, 3)
    new = convfactor.factorize(layer, "lowrank_sparse", rank=ranks, admm_iters=30)
    x = torch.randn(2, 30) if spec.is_linear else torch.randn(1, 12, *([20, 18][:spec.dim]))
    counted = convfactor.count(new, x)
    size = () if spec.is_linear else tuple(x.shape[2:])
    cost = LS.cost(spec, ranks, size)
    assert counted["macs"] == cost.macs * (2 if spec.is_linear else 1)
    assert counted["params"] == cost.params
    # the dense kernel of the module is what it computes
    dense = LS.reconstruct(LS.factors_of(new), spec)
    ref = (nn.functional.linear(x, dense.float(), new[0].lowrank[-1].bias) if spec.is_linear else
           type(layer)(12, 16, spec.kernel_size, stride=spec.stride, dilation=spec.dilation,
                       padding=[p for p, _ in spec.padding], padding_mode=spec.padding_mode))
    if not spec.is_linear:
        with torch.no_grad():
            ref.weight.copy_(dense)
            ref.bias.copy_(new[0].lowrank[-1].bias)
        ref = ref(x)
    with torch.no_grad():
        assert rel_err(new(x).double(), ref.double()) < 1e-5
    model = nn.Sequential(layer)
    convfactor.save(nn.Sequential(new), tmp_path / "m")
    loaded = convfactor.load(tmp_path / "m", model)
    with torch.no_grad():
        assert torch.equal(loaded(x), new(x))


def test_macs_ratio_splits_the_budget():
    layer = nn.Conv2d(32, 32, 3, padding=1)
    spec = ConvSpec.from_module(layer)
    r, s = LS.resolve_ranks(spec, layer.weight, macs_ratio=0.5, input_size=(16, 16))
    assert s == 4 and LS.cost(spec, (r, s), (16, 16)).macs <= 0.5 * spec.dense_macs((16, 16))
    assert LS.cost(spec, (r + 1, s), (16, 16)).macs > 0.5 * spec.dense_macs((16, 16))
    assert registry.get("lowrank_sparse", sparse_fraction=0).resolve_ranks(
        spec, layer.weight, macs_ratio=0.5, input_size=(16, 16))[1] == 0
    new = convfactor.factorize(layer, "lowrank_sparse", macs_ratio=0.5, input_size=(16, 16), sparse_fraction=0.5,
                               admm_iters=20)
    assert new.ranks[1] == 8


def test_bad_input():
    with pytest.raises(UnsupportedLayer, match="groups"):
        convfactor.factorize(nn.Conv2d(8, 8, 3, groups=2), "lowrank_sparse", rank=2)
    with pytest.raises(ValueError, match="channels"):
        convfactor.factorize(nn.Conv2d(8, 8, 3), "lowrank_sparse", rank=(2, 9))
    with pytest.raises(ValueError, match="relu"):
        convfactor.factorize(nn.Conv2d(8, 8, 3), "lowrank_sparse", rank=2, calibration=torch.randn(1, 8, 6, 6),
                             relu=True)


def test_compress_rule_with_calibration():
    model = convfactor.models.get("resnet20").eval()
    g = torch.Generator().manual_seed(0)
    x, calib = torch.randn(2, 3, 32, 32, generator=g), [torch.randn(4, 3, 32, 32, generator=g)]
    rule = {"op_names": ["layer3.0.conv2"], "method": "lowrank_sparse", "macs_ratio": 0.5, "admm_iters": 50}
    plain, rep_w = convfactor.compress(model, [rule], x)
    aware, rep_d = convfactor.compress(model, [dict(rule, data_aware=True)], x, calibration=calib)
    (lw,), (ld,) = rep_w.compressed, rep_d.compressed
    assert lw.ranks == ld.ranks and lw.macs_after == ld.macs_after <= 0.5 * lw.macs_before
    assert ld.output_error < lw.output_error
    assert 0 < ld.weight_error and lw.weight_error <= ld.weight_error   # fits responses, not weights


def test_without_admm_support_the_rank_r_residual_picks_the_channels():
    a0, b0 = _planted(2)
    w = a0 + b0
    gram = torch.eye(C * K, dtype=torch.float64)
    left, right, sparse, index = ls.refit_structure(w, gram, C, torch.zeros_like(w), PLANTED_RANK, 3)
    assert index.tolist() == PLANTED_CHANNELS
    approx = left @ right
    approx.reshape(N, C, K)[:, index] += sparse.reshape(N, -1, K)
    assert rel_err(approx, w) < 1e-6

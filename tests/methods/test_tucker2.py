"""Tucker-2 (Kim et al. 2016): HOOI never loses to HOSVD, exactness for Conv1d/2d/3d, rank semantics."""
import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import convfactor
from convfactor.spec.convspec import ConvSpec, conv_class, conv_of
from convfactor.methods import registry
from convfactor.methods.tucker2 import tucker2
from strategies import (convnd_configs, convnd_grid, full_rank_replacement, input_nd, make_nd, refusal, rel_err,
                        shape_spec)

M = registry.get("tucker2")


def hosvd_error2(t: torch.Tensor, r1: int, r2: int) -> float:
    """Squared error of the truncated HOSVD of ``t: (N, C, kv)``, from full SVDs of the unfoldings."""
    n, c, kv = t.shape
    u2 = torch.linalg.svd(t.reshape(n, -1), full_matrices=False)[0][:, :r2]
    u1 = torch.linalg.svd(t.transpose(0, 1).reshape(c, -1), full_matrices=False)[0][:, :r1]
    approx = torch.einsum("nb,mb,mdk,da,ca->nck", u2, u2, t, u1, u1)
    return (approx - t).pow(2).sum().item()


@given(n=st.integers(2, 7), c=st.integers(2, 7), k=st.sampled_from([(2,), (3,), (2, 2), (3, 2), (2, 1, 2)]),
       groups=st.sampled_from([1, 2]), r1=st.integers(1, 7), r2=st.integers(1, 7), seed=st.integers(0, 3))
def test_hooi_error_never_above_hosvd(n, c, k, groups, r1, r2, seed):
    w = torch.randn(n * groups, c, *k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    layer = conv_class(len(k))(c * groups, n * groups, k, groups=groups)
    spec = ConvSpec.from_module(layer)
    f1, f2 = M.full_rank(spec)
    r1, r2 = min(r1, f1), min(r2, f2)
    total = w.pow(2).sum().item()
    hosvd = M.reconstruct(registry.get("tucker2", hooi_iters=0).factorize(w, spec, (r1, r2)), spec)
    hooi = M.reconstruct(registry.get("tucker2", hooi_iters=20, hooi_tol=0.0).factorize(w, spec, (r1, r2)), spec)
    e_hosvd, e_hooi = (hosvd - w).pow(2).sum().item(), (hooi - w).pow(2).sum().item()
    groups_t = w.reshape(groups, n, c, -1)
    reference = sum(hosvd_error2(groups_t[g], r1, r2) for g in range(groups))
    assert e_hosvd == pytest.approx(reference, rel=1e-9, abs=1e-12 * total)   # iters=0 is the textbook HOSVD
    assert e_hooi <= e_hosvd + 1e-10 * total
    # no Tucker-2 beats truncating either channel mode alone (Eckart-Young on each unfolding)
    s_out = torch.linalg.svdvals(groups_t.reshape(groups, n, -1))
    s_in = torch.linalg.svdvals(groups_t.transpose(1, 2).reshape(groups, c, -1))
    bound = max(s_out[:, r2:].pow(2).sum().item(), s_in[:, r1:].pow(2).sum().item())
    assert e_hooi >= bound - 1e-10 * total


def test_hooi_errors_decrease_and_stop_on_tolerance():
    t = torch.randn(1, 24, 20, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    *_, info = tucker2(t, 6, 7, iters=50, tol=0.0)
    errs = info["errors"]
    assert len(errs) > 4 and all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:]))
    *_, loose = tucker2(t, 6, 7, iters=50, tol=1e-2)
    assert loose["sweeps"] < info["sweeps"]
    last = loose["errors"]
    assert (last[-2] - last[-1]) <= 1e-2 * last[-2]                    # stopped because the change was small
    assert all((a - b) > 1e-2 * a for a, b in zip(last[:-2], last[1:-1]))   # and not before


def test_matrix_case_is_the_truncated_svd():
    # a 1x1 kernel is a matrix: Tucker-2 at (r1, r2) is its rank-min(r1, r2) truncated SVD
    layer = nn.Conv2d(10, 7, 1, dtype=torch.float64)
    spec = ConvSpec.from_module(layer)
    w = layer.weight.detach()
    approx = M.reconstruct(M.factorize(w, spec, (5, 3)), spec)
    s = torch.linalg.svdvals(w.reshape(7, 10))
    assert (approx - w).pow(2).sum().item() == pytest.approx(s[3:].pow(2).sum().item(), rel=1e-9)


@pytest.mark.parametrize("dim", [1, 3])
@given(data=st.data())
def test_full_rank_reproduces_conv1d_conv3d(dim, data):
    layer = make_nd(data.draw(convnd_configs(dim, method="tucker2")), dim)
    new = full_rank_replacement(layer, "tucker2")
    assert all(isinstance(conv_of(p), conv_class(dim)) for p in new)
    x = input_nd(layer, dim)
    with torch.no_grad():
        assert rel_err(new(x), layer(x)) <= 1e-6


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_refuses_exactly_when_both_channel_modes_have_rank_one(dim):
    """Mode C's unfolding is (C/g) x (N/g kv), mode N's (N/g) x (C/g kv): a layer is refused, with the
    reason, exactly when both are vectors (full rank (1, 1)), over every shape the test above could draw."""
    for shape in convnd_grid(dim):
        groups, cin, cout, kernel = shape
        c, n, kv = cin // groups, cout // groups, math.prod(kernel)
        one = min(c, n * kv) == 1 and min(n, c * kv) == 1
        assert refusal("tucker2", shape) == ("tucker2: full rank is (1, 1), nothing to factorize" if one else None)
        assert (M.full_rank(shape_spec(shape)) == (1, 1)) == one, shape


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_cost_matches_flop_counter(dim):
    k = (3, 2, 3)[:dim]
    layer = conv_class(dim)(8, 12, k, stride=2, padding=1, groups=2)
    spec = ConvSpec.from_module(layer)
    new = convfactor.factorize(layer, "tucker2", rank=(3, 4))
    size = (10, 9, 8)[:dim]
    counted = convfactor.count(new, torch.randn(1, 8, *size))
    cost = M.cost(spec, (3, 4), size)
    assert counted["macs"] == cost.macs and counted["params"] == cost.params


def test_pieces_and_options():
    layer = nn.Conv2d(16, 24, 3, stride=2, padding=1, dilation=1, padding_mode="replicate", groups=2)
    first, core, last = convfactor.factorize(layer, "tucker2", rank=(4, 6))
    assert first.kernel_size == (1, 1) and first.groups == 2 and first.out_channels == 8 and first.bias is None
    assert core.kernel_size == (3, 3) and core.stride == (2, 2) and core.padding_mode == "replicate"
    assert (core.in_channels, core.out_channels, core.groups) == (8, 12, 2)
    assert last.kernel_size == (1, 1) and last.in_channels == 12 and last.bias is not None


def test_energy_target_is_per_mode():
    layer = nn.Conv2d(12, 16, 3, dtype=torch.float64)
    w = layer.weight.detach()
    new = convfactor.factorize(layer, "tucker2", energy=0.9)
    expected = []
    for unfolding in (w.transpose(0, 1).reshape(12, -1), w.reshape(16, -1)):     # mode C, then mode N
        s2 = torch.linalg.svdvals(unfolding).pow(2)
        frac = s2.cumsum(0) / s2.sum()
        expected.append(int((frac < 0.9).sum()) + 1)
    assert new.ranks == tuple(expected)


def test_int_rank_expands_and_clips():
    spec = ConvSpec.from_module(nn.Conv2d(3, 64, 3))           # full ranks (min(3, 576), min(64, 27)) = (3, 27)
    assert M.full_rank(spec) == (3, 27)
    assert M.expand_rank(spec, 16) == (3, 16)
    assert M.expand_rank(spec, 27) == (3, 27)
    assert M.expand_rank(spec, (2, 5)) == (2, 5)
    for bad in (0, 28, -1):
        with pytest.raises(ValueError, match="out of range"):
            M.resolve_ranks(spec, rank=bad)
    with pytest.raises(ValueError, match="r1=4 is out of range"):
        M.resolve_ranks(spec, rank=(4, 5))
    with pytest.raises(ValueError, match="r2=28 is out of range"):
        M.resolve_ranks(spec, rank=(3, 28))
    for bad in ((1, 2, 3), 2.5, "3", True):
        with pytest.raises(ValueError, match="rank"):
            M.resolve_ranks(spec, rank=bad)


def test_scaled_ranks_follow_channels():
    spec = ConvSpec.from_module(nn.Conv2d(32, 64, 3, groups=2))
    assert M.scaled_ranks(spec, 0.25) == (4, 8)
    assert M.scaled_ranks(spec, 1.0) == M.full_rank(spec)
    ranks = M.resolve_ranks(spec, macs_ratio=0.3, input_size=(16, 16))
    assert M.cost(spec, ranks, (16, 16)).macs <= 0.3 * spec.dense_macs((16, 16))


@pytest.mark.parametrize("opts", [{"hooi_iters": -1}, {"hooi_iters": 1.5}, {"hooi_tol": -1.0}, {"hooi_tol": "x"}])
def test_bad_hooi_options(opts):
    with pytest.raises(ValueError, match="hooi"):
        convfactor.factorize(nn.Conv2d(8, 8, 3), "tucker2", rank=4, **opts)


def test_float32_layer_and_exactly_low_rank_kernel():
    # a kernel of multilinear rank (3, 2) is recovered to float64 precision at ranks (3, 2)
    g = torch.Generator().manual_seed(2)
    core = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64)
    u1 = torch.linalg.qr(torch.randn(10, 3, generator=g, dtype=torch.float64))[0]
    u2 = torch.linalg.qr(torch.randn(9, 2, generator=g, dtype=torch.float64))[0]
    w = torch.einsum("nb,bahw,ca->nchw", u2, core, u1)
    layer = nn.Conv2d(10, 9, 3, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
    spec = ConvSpec.from_module(layer)
    approx = M.reconstruct(M.factorize(w, spec, (3, 2)), spec)
    assert rel_err(approx, w) < 1e-12
    new = convfactor.factorize(layer.float(), "tucker2", rank=(3, 2))
    assert all(p.dtype == torch.float32 for p in new.parameters())


def test_save_load_round_trip_conv3d(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(4, 6, 3, padding=1, padding_mode="replicate"), nn.ReLU(), nn.Conv3d(6, 6, 2))
    x = torch.randn(1, 4, 6, 6, 6)
    compressed, report = convfactor.compress(model, [{"op_types": ["Conv3d"], "method": "tucker2", "rank": 3}], x)
    assert [L.ranks for L in report.compressed] == [(3, 3), (3, 3)]
    convfactor.save(compressed, tmp_path / "m")
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Conv3d(4, 6, 3, padding=1, padding_mode="replicate"), nn.ReLU(), nn.Conv3d(6, 6, 2))
    assert torch.equal(convfactor.load(tmp_path / "m", fresh)(x), compressed(x))

"""CP (Lebedev et al. 2015) and its torch-native ALS."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import convfactor
from convfactor.spec.convspec import ConvSpec
from convfactor.methods import registry
from convfactor.methods.cp import cp_als, cp_reconstruct, exact_cp, full_cp_rank
from strategies import input_for, rel_err

CP = registry.get("cp")

LAYERS = [
    # Conv1d: stride, dilation, reflect padding, groups, bias
    lambda: nn.Conv1d(6, 4, 3, stride=2, padding=2, dilation=2, padding_mode="reflect", groups=2, dtype=torch.float64),
    lambda: nn.Conv1d(3, 5, 4, padding="same", padding_mode="circular", bias=False, dtype=torch.float64),
    # Conv2d: asymmetric 'same' (even kernel), replicate; stride + dilation + groups
    lambda: nn.Conv2d(4, 6, (2, 3), padding="same", padding_mode="replicate", dtype=torch.float64),
    lambda: nn.Conv2d(4, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2, dtype=torch.float64),
    # Conv3d: three depthwise 1-D convs
    lambda: nn.Conv3d(3, 4, (3, 2, 2), stride=(1, 2, 1), padding=(1, 0, 1), padding_mode="circular", dtype=torch.float64),
    lambda: nn.Conv3d(4, 2, 3, padding="same", groups=2, bias=False, dtype=torch.float64),
]


def _input(layer):
    return input_for(layer, size=(9, 8, 7))


@pytest.mark.parametrize("form", ["separable", "folded"])
@pytest.mark.parametrize("make", LAYERS)
def test_exact_at_full_rank_all_dims_and_options(make, form):
    torch.manual_seed(3)
    layer = make()
    spec = ConvSpec.from_module(layer)
    full = CP.full_rank(spec)
    new = convfactor.factorize(layer, "cp", rank=full, form=form)
    x = _input(layer)
    with torch.no_grad():
        assert rel_err(new(x), layer(x)) <= 1e-10
    # depthwise pieces: one per spatial axis, or one for all axes when folded
    depthwise = [m for m in new.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.in_channels > 1]
    assert len(depthwise) == (spec.dim if form == "separable" else 1)


@given(dims=st.lists(st.integers(1, 5), min_size=2, max_size=5), batch=st.integers(1, 2), seed=st.integers(0, 99))
def test_exact_cp_construction(dims, batch, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(batch, *dims, generator=g, dtype=torch.float64)
    fs = exact_cp(t)
    assert fs[0].shape[-1] == full_cp_rank(dims) == math.prod(dims) // max(dims)
    assert torch.allclose(cp_reconstruct(fs), t, atol=1e-12)
    padded = exact_cp(t, full_cp_rank(dims) + 3)             # larger ranks: zero terms appended
    assert torch.allclose(cp_reconstruct(padded), t, atol=1e-12)


@given(n=st.integers(1, 6), c=st.integers(1, 6), ks=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       rank=st.integers(1, 8), batch=st.integers(1, 2), seed=st.integers(0, 999),
       init=st.sampled_from(["svd", "random", "slices"]), linesearch=st.booleans())
@settings(max_examples=40)
def test_als_error_never_increases(n, c, ks, rank, batch, seed, init, linesearch):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(batch, n, c, *ks, generator=g, dtype=torch.float64)
    res = cp_als(t, rank, n_iter=25, tol=0, init=init, seed=seed, linesearch=linesearch)
    errs = torch.tensor(res.errors)
    assert torch.isfinite(errs).all()
    assert (errs[1:] <= errs[:-1] + 1e-10).all(), res.errors
    # the tracked error is the true error of the returned factors
    true = ((cp_reconstruct(res.factors) - t).norm() / t.norm()).item()
    assert abs(true - res.errors[-1]) <= 1e-6


@pytest.mark.parametrize("dims", [(8, 8, 3, 3), (10, 7, 4), (6, 6, 3, 2, 2)])
def test_als_recovers_a_planted_cp(dims):
    g = torch.Generator().manual_seed(7)
    rank = 4
    # well conditioned: orthonormal-ish columns in the channel modes
    factors = [torch.linalg.qr(torch.randn(1, dims[0], rank, generator=g, dtype=torch.float64))[0],
               torch.linalg.qr(torch.randn(1, dims[1], rank, generator=g, dtype=torch.float64))[0]]
    factors += [torch.randn(1, d, rank, generator=g, dtype=torch.float64) for d in dims[2:]]
    t = cp_reconstruct(factors)
    res = cp_als(t, rank, n_iter=500, tol=0)
    true = ((cp_reconstruct(res.factors) - t).norm() / t.norm()).item()
    assert true < 1e-6


def test_zero_kernel_gives_zero_factors_and_no_nan():
    layer = nn.Conv2d(6, 5, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.zero_()
    for rank in (2, 5):
        new = convfactor.factorize(layer, "cp", rank=rank)
        for p in new.parameters():
            assert torch.isfinite(p).all()
        x = _input(layer)
        with torch.no_grad():
            assert torch.allclose(new(x), layer(x))


def test_rank_deficient_kernel_no_nan_and_exact_at_its_rank():
    g = torch.Generator().manual_seed(2)
    # a rank-2 kernel with a zero output channel and a zero input channel, fitted at ranks 1..5
    fs = [torch.randn(1, d, 2, generator=g, dtype=torch.float64) for d in (6, 5, 3, 3)]
    fs[0][0, 0] = 0
    fs[1][0, 1] = 0
    w = cp_reconstruct(fs)[0]
    layer = nn.Conv2d(5, 6, 3, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
    errors = []
    for rank in (1, 2, 3, 5):
        res = cp_als(w.unsqueeze(0), rank, n_iter=150, tol=0)
        assert all(torch.isfinite(f).all() for f in res.factors)
        assert math.isfinite(res.errors[-1])
        errors.append(res.errors[-1])
        new = convfactor.factorize(layer, "cp", rank=rank, n_iter=20)
        assert all(torch.isfinite(p).all() for p in new.parameters())
    assert errors[1] < 1e-6                      # rank 2 is exact
    assert max(errors[2:]) < 1e-4                # over-parameterized fits stay accurate


@pytest.mark.parametrize("make", [LAYERS[0], LAYERS[3], LAYERS[4]])
def test_folded_form_equals_separable(make):
    layer = make()
    spec = ConvSpec.from_module(layer)
    r = max(1, CP.full_rank(spec)[0] // 2)
    sep = convfactor.factorize(layer, "cp", rank=r, n_iter=20, form="separable")
    fold = convfactor.factorize(layer, "cp", rank=r, n_iter=20, form="folded")
    assert fold.options["form"] == "folded" and sep.options["form"] == "separable"
    x = _input(layer)
    with torch.no_grad():
        assert rel_err(fold(x), sep(x)) <= 1e-12


@pytest.mark.parametrize("form", ["separable", "folded"])
@pytest.mark.parametrize("make", [LAYERS[0], LAYERS[2], LAYERS[3], LAYERS[5]])
def test_cost_matches_flop_counter_both_forms(make, form):
    layer = make().float()
    spec = ConvSpec.from_module(layer)
    r = max(1, CP.full_rank(spec)[0] // 3)
    new = convfactor.factorize(layer, "cp", rank=r, n_iter=5, form=form)
    x = input_for(layer, size=(9, 8, 7), batch=1, dtype=torch.float32)
    counted = convfactor.count(new, x)
    cost = registry.get("cp", form=form).cost(spec, (r,), tuple(x.shape[2:]))
    assert (counted["macs"], counted["params"]) == (cost.macs, cost.params)


def test_folded_form_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))
    new = convfactor.compress(model, {"op_types": ["Conv2d"], "method": "cp", "rank": 6, "form": "folded",
                                      "n_iter": 10}, torch.randn(1, 4, 12, 12))
    new = new[0] if isinstance(new, tuple) else new
    convfactor.save(new, tmp_path / "m")
    loaded = convfactor.load(tmp_path / "m", model)
    x = torch.randn(2, 4, 12, 12)
    for name, mod in loaded.named_modules():
        if getattr(mod, "method", None) == "cp":
            assert mod.options["form"] == "folded" and len(mod) == 3
    with torch.no_grad():
        assert torch.allclose(loaded(x), new(x), atol=1e-6)


def test_clear_errors():
    layer = nn.Conv2d(8, 8, 3)
    with pytest.raises(ValueError, match="energy"):
        convfactor.factorize(layer, "cp", energy=0.9)
    with pytest.raises(ValueError, match="form"):
        convfactor.factorize(layer, "cp", rank=4, form="fused")
    with pytest.raises(ValueError, match="unknown option"):
        convfactor.factorize(layer, "cp", rank=4, splits=2)
    with pytest.raises(ValueError, match="rank"):
        convfactor.factorize(layer, "cp", rank=CP.full_rank(ConvSpec.from_module(layer))[0] + 1)
    with pytest.raises(convfactor.UnsupportedLayer):
        convfactor.factorize(nn.Linear(8, 8), "cp", rank=2)
    with pytest.raises(ValueError, match="init"):
        cp_als(torch.randn(1, 3, 3, 2), 2, init="nope")


def test_macs_ratio_and_pointwise():
    layer = nn.Conv2d(32, 32, 3, padding=1)
    new = convfactor.factorize(layer, "cp", macs_ratio=0.25, input_size=(16, 16), n_iter=5)
    spec = ConvSpec.from_module(layer)
    assert CP.cost(spec, new.ranks, (16, 16)).macs <= 0.25 * spec.dense_macs((16, 16))
    # the folded form's cost (one kxk depthwise conv) is what its macs_ratio target is met on
    fold = convfactor.factorize(layer, "cp", macs_ratio=0.25, input_size=(16, 16), n_iter=5, form="folded")
    folded = registry.get("cp", form="folded")
    assert folded.cost(spec, fold.ranks, (16, 16)).macs <= 0.25 * spec.dense_macs((16, 16))
    assert folded.cost(spec, (fold.ranks[0] + 1,), (16, 16)).macs > 0.25 * spec.dense_macs((16, 16))
    assert fold.ranks[0] < new.ranks[0]          # 9 depthwise MACs per term instead of 3 + 3
    # a 1x1 conv is a matrix: the CP is its truncated SVD (Eckart-Young optimal)
    pw = nn.Conv2d(12, 10, 1, dtype=torch.float64)
    fac = CP.factorize(pw.weight.detach(), ConvSpec.from_module(pw), (4,))
    approx = CP.reconstruct(fac, ConvSpec.from_module(pw)).reshape(10, 12)
    s = torch.linalg.svdvals(pw.weight.detach().reshape(10, 12))
    assert torch.allclose((approx - pw.weight.reshape(10, 12)).pow(2).sum(), s[4:].pow(2).sum(), rtol=1e-9)


def test_slices_init_is_exact_at_slice_rank():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(2, 5, 4, 3, 2, generator=g, dtype=torch.float64)      # groups=2, min(N, C) * K = 24
    res = cp_als(t, 24, n_iter=0, init="slices")
    assert res.errors == [] and torch.allclose(cp_reconstruct(res.factors), t, atol=1e-10)
    assert cp_als(t, 24, n_iter=1, init="slices").errors[0] < 1e-9

"""Tensor-train Linear / 1x1 conv (issue 7, item 1)."""
import math

import pytest
import torch
from torch import nn

import convfactor
from convfactor.spec.convspec import ConvSpec, UnsupportedLayer
from convfactor.methods import registry
from convfactor.methods import tt as ttmod
from strategies import rel_err

TT = registry.get("tt")


def _linear(i, o, bias=True, dtype=torch.float64):
    return nn.Linear(i, o, bias=bias, dtype=dtype)


@pytest.mark.parametrize("shape,modes", [((24, 30), None), ((24, 30), ([2, 3, 4], [5, 3, 2])),
                                         ((64, 48), ([4, 4, 4], [4, 3, 4])), ((60, 8), ([3, 4, 5], [2, 2, 2])),
                                         ((7, 9), ([7, 1], [3, 3]))])
@pytest.mark.parametrize("bias", [True, False])
def test_full_tt_ranks_reproduce_linear(shape, modes, bias):
    layer = _linear(*shape, bias=bias)
    kw = {} if modes is None else {"in_modes": modes[0], "out_modes": modes[1]}
    spec = ConvSpec.from_module(layer)
    full = registry.get("tt", **kw).full_rank(spec)
    new = convfactor.factorize(layer, "tt", rank=list(full), **kw)
    x = torch.randn(5, shape[0], dtype=torch.float64)
    assert rel_err(new(x), layer(x)) <= 1e-10
    assert (new[0].bias is not None) == bias
    # an int rank is a cap on every bond: a large one is the full rank too
    assert convfactor.factorize(layer, "tt", rank=10 ** 6, **kw).ranks == full


def test_tt_svd_error_bound_oseledets():
    """Oseledets 2011, Thm 2.2: ||W - TT(W)||_F^2 <= sum_k (discarded squared singular values at step k)."""
    torch.manual_seed(1)
    w = torch.randn(64, 48, dtype=torch.float64)
    in_m, out_m = (4, 4, 3), (4, 4, 4)
    _, spectra = ttmod.tt_svd(w, in_m, out_m)        # untruncated: the unfoldings' singular values
    ranks = (5, 7)
    cores, _ = ttmod.tt_svd(w, in_m, out_m, ranks)
    err2 = (ttmod.tt_full(cores) - w).pow(2).sum().item()
    bound = sum(s[r:].pow(2).sum().item() for s, r in zip(spectra, ranks))
    assert err2 <= bound * (1 + 1e-9)
    # and it is not trivially loose: at least the largest single-bond truncation is lost
    assert err2 >= max(s[r:].pow(2).sum().item() for s, r in zip(spectra, ranks)) * (1 - 1e-9)


def test_unfolding_spectra_match_direct_svd():
    torch.manual_seed(2)
    w = torch.randn(12, 20, dtype=torch.float64)
    in_m, out_m = (4, 5), (3, 4)
    _, spectra = ttmod.tt_svd(w, in_m, out_m)
    unfold = w.reshape(3, 4, 4, 5).permute(0, 2, 1, 3).reshape(12, 20)    # (m1 n1, m2 n2)
    assert torch.allclose(spectra[0], torch.linalg.svdvals(unfold), atol=1e-10)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_pointwise_conv_with_options(dim):
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    layer = conv_cls(12, 8, 1, stride=2, padding=1, padding_mode="reflect", dtype=torch.float64)
    new = convfactor.factorize(layer, "tt", rank=100, in_modes=[3, 4], out_modes=[2, 4])
    x = torch.randn(2, 12, *([7] * dim), dtype=torch.float64)
    assert new(x).shape == layer(x).shape
    assert rel_err(new(x), layer(x)) <= 1e-10


def test_forward_never_builds_the_matrix_and_cost_matches_counter(monkeypatch):
    layer = _linear(256, 256)
    new = convfactor.factorize(layer, "tt", rank=4, in_modes=[4, 4, 4, 4], out_modes=[4, 4, 4, 4])
    monkeypatch.setattr(ttmod, "tt_full", lambda *a, **k: pytest.fail("forward rebuilt the matrix"))
    x = torch.randn(3, 256, dtype=torch.float64)
    counted = convfactor.count(new, x)
    cost = registry.get("tt", in_modes=[4, 4, 4, 4], out_modes=[4, 4, 4, 4]).cost(ConvSpec.from_module(layer),
                                                                                  new.ranks)
    assert counted["macs"] == 3 * cost.macs
    assert counted["params"] == cost.params == sum(p.numel() for p in new.parameters())
    assert cost.macs < 256 * 256


def test_cost_matches_counter_for_conv():
    layer = nn.Conv2d(16, 12, 1, stride=2, bias=False)
    new = convfactor.factorize(layer, "tt", rank=3)
    x = torch.randn(1, 16, 9, 9)
    assert convfactor.count(new, x)["macs"] == TT.cost(ConvSpec.from_module(layer), new.ranks, (9, 9)).macs


def test_targets():
    torch.manual_seed(3)
    layer = _linear(256, 128)
    spec = ConvSpec.from_module(layer)
    ranks = TT.resolve_ranks(spec, layer.weight, macs_ratio=0.3)
    assert TT.cost(spec, ranks).macs <= 0.3 * 256 * 128
    bigger = tuple(r + 1 for r in ranks)
    assert any(b <= f for b, f in zip(bigger, TT.full_rank(spec)))   # not degenerate
    assert TT.resolve_ranks(spec, layer.weight, energy=1.0) == TT.full_rank(spec)
    low = convfactor.factorize(layer, "tt", energy=0.5)
    assert all(a <= b for a, b in zip(low.ranks, TT.full_rank(spec)))
    with pytest.raises(ValueError, match="unreachable"):
        TT.resolve_ranks(spec, layer.weight, macs_ratio=1e-5)


def test_balanced_modes():
    assert math.prod(ttmod.balanced_modes(25088, 5)) == 25088
    assert max(ttmod.balanced_modes(4096, 4)) == 8 and min(ttmod.balanced_modes(4096, 4)) == 8
    assert sorted(ttmod.balanced_modes(10, 3)) == [1, 2, 5]


def test_bad_input_fails_clearly():
    layer = _linear(24, 30)
    with pytest.raises(ValueError, match="multiply"):
        convfactor.factorize(layer, "tt", rank=2, in_modes=[2, 3, 5], out_modes=[5, 3, 2])
    with pytest.raises(ValueError, match="same length"):
        convfactor.factorize(layer, "tt", rank=2, in_modes=[4, 6], out_modes=[5, 3, 2])
    with pytest.raises(ValueError, match="TT-ranks"):
        convfactor.factorize(layer, "tt", rank=[2, 2, 2], in_modes=[2, 3, 4], out_modes=[5, 3, 2])
    with pytest.raises(ValueError, match="out of range"):
        convfactor.factorize(layer, "tt", rank=[2, 999], in_modes=[2, 3, 4], out_modes=[5, 3, 2])
    with pytest.raises(UnsupportedLayer, match="1x1"):
        convfactor.factorize(nn.Conv2d(8, 8, 3), "tt", rank=2)
    with pytest.raises(UnsupportedLayer, match="groups"):
        convfactor.factorize(nn.Conv2d(8, 8, 1, groups=2), "tt", rank=2)


def test_dtype_preserved_and_float32_close():
    layer = nn.Linear(64, 32)
    new = convfactor.factorize(layer, "tt", rank=1000)
    assert all(p.dtype == torch.float32 for p in new.parameters())
    x = torch.randn(4, 64)
    assert rel_err(new(x).double(), layer(x).double()) < 1e-4


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 60)
        self.fc2 = nn.Linear(60, 10)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.conv(x), 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def test_save_load_roundtrip_with_mode_shapes(tmp_path):
    model = _Net().eval()
    x = torch.randn(2, 3, 16, 16)
    rules = [{"op_names": ["fc1"], "method": "tt", "rank": 3, "in_modes": [8, 4, 4], "out_modes": [3, 4, 5]},
             {"op_names": ["fc2"], "method": "tt", "rank": 2}]
    compressed, report = convfactor.compress(model, rules, x)
    by = {L.name: L for L in report.compressed}
    assert compressed.fc1.options == {"in_modes": [8, 4, 4], "out_modes": [3, 4, 5]}
    counted = convfactor.count(compressed, x)["layers"]
    assert by["fc1"].macs_after == counted["fc1.0"]["macs"] // 2      # batch of 2
    assert by["fc1"].params_after == counted["fc1.0"]["params"]
    convfactor.save(compressed, tmp_path / "m")
    loaded = convfactor.load(tmp_path / "m", model)
    assert torch.equal(loaded(x), compressed(x))
    assert loaded.fc1[0].in_modes == (8, 4, 4)


@pytest.mark.parametrize("in_modes,out_modes,reverse", [((2, 8), (8, 2), True), ((8, 2), (2, 8), False),
                                                        ((2, 3, 4), (4, 3, 2), None)])
def test_both_sweep_directions_are_exact_and_counted(in_modes, out_modes, reverse):
    layer = _linear(math.prod(in_modes), math.prod(out_modes))
    for rank in (2, 10 ** 6):
        new = convfactor.factorize(layer, "tt", rank=rank, in_modes=list(in_modes), out_modes=list(out_modes))
        if reverse is not None:
            assert new[0].reverse == reverse
        x = torch.randn(3, layer.in_features, dtype=torch.float64)
        dense = TT.reconstruct(TT.factors_of(new), ConvSpec.from_module(layer)).reshape(layer.weight.shape)
        assert rel_err(new(x), x @ dense.T + layer.bias) <= 1e-10
        assert convfactor.count(new, x)["macs"] == 3 * ttmod.tt_macs(in_modes, out_modes, new.ranks)
    assert rel_err(new(x), layer(x)) <= 1e-10       # the last one is at full rank

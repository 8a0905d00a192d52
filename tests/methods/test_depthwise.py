"""Depthwise-separable factorization: per-channel optimality, exactness for Conv1d/2d/3d, ranks."""
import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import convfactor
from convfactor.spec.convspec import ConvSpec, UnsupportedLayer, conv_class, conv_of
from convfactor.methods import registry
from strategies import check_exact, convnd_configs, convnd_grid, input_nd, make_nd, refusal, rel_err, shape_spec

M = registry.get("depthwise")


def slice_of(w: torch.Tensor, groups: int, c: int) -> torch.Tensor:
    """Input channel c's (N/g, kv) slice: its own group's output channels, all taps."""
    cg, ng = w.shape[1], w.shape[0] // groups
    g, local = divmod(c, cg)
    return w[g * ng:(g + 1) * ng, local].reshape(ng, -1)


@given(n=st.integers(1, 6), c=st.integers(1, 4), k=st.sampled_from([(2,), (3,), (3, 3), (2, 3), (1, 2, 2)]),
       groups=st.sampled_from([1, 2, 3]), r=st.integers(1, 9))
def test_truncation_error_equals_discarded_energy(n, c, k, groups, r):
    w = torch.randn(n * groups, c, *k, generator=torch.Generator().manual_seed(n + 7 * c), dtype=torch.float64)
    spec = ConvSpec.from_module(conv_class(len(k))(c * groups, n * groups, k, groups=groups))
    r = min(r, M.full_rank(spec)[0])
    approx = M.reconstruct(M.factorize(w, spec, (r,)), spec)
    discarded = sum(torch.linalg.svdvals(slice_of(w, groups, ch))[r:].pow(2).sum() for ch in range(c * groups))
    assert abs((approx - w).pow(2).sum() - discarded) <= 1e-9 * w.pow(2).sum() + 1e-12
    (s,) = M.spectra(w, spec)
    assert s.shape == (c * groups, M.full_rank(spec)[0])
    last = c * groups - 1
    assert torch.allclose(s[last].pow(2), torch.linalg.svdvals(slice_of(w, groups, last)).pow(2), atol=1e-10)


@pytest.mark.parametrize("dim", [1, 2, 3])
@given(data=st.data())
def test_full_rank_reproduces_conv_nd(dim, data):
    layer = make_nd(data.draw(convnd_configs(dim, method="depthwise")), dim)
    check_exact(layer, "depthwise", input_nd(layer, dim), 1e-6)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_refuses_exactly_one_tap_kernels_and_one_output_per_group(dim):
    """Each input channel's (N/g, kv) slice has rank 1 when the kernel has one tap or a group one output:
    exactly those layers are refused, with the reason, over every shape the test above could draw."""
    for shape in convnd_grid(dim):
        groups, cin, cout, kernel = shape
        one = cout // groups == 1 or math.prod(kernel) == 1
        assert refusal("depthwise", shape) == ("depthwise: full rank is (1,), nothing to factorize" if one else None)
        assert (M.full_rank(shape_spec(shape)) == (1,)) == one, shape


def test_structure_of_the_pieces():
    layer = nn.Conv3d(6, 8, (3, 1, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1),
                      padding_mode="circular", groups=2)
    dw, pw = convfactor.factorize(layer, "depthwise", rank=2)
    dw, pw = conv_of(dw), conv_of(pw)
    assert isinstance(dw, nn.Conv3d) and dw.groups == 6 and dw.out_channels == 12 and dw.kernel_size == (3, 1, 2)
    assert dw.stride == (1, 2, 1) and dw.dilation == (2, 1, 1) and dw.padding_mode == "circular" and dw.bias is None
    assert pw.kernel_size == (1, 1, 1) and pw.groups == 2 and pw.in_channels == 12 and pw.bias is not None


def test_truncated_module_computes_the_reconstructed_kernel():
    layer = nn.Conv2d(6, 10, 3, padding=1, padding_mode="reflect", groups=2, dtype=torch.float64)
    spec = ConvSpec.from_module(layer)
    new = convfactor.factorize(layer, "depthwise", rank=2)
    dense = M.reconstruct({k: conv_of(p).weight.detach() for k, p in zip(M.factor_names, new)}, spec)
    ref = nn.Conv2d(6, 10, 3, padding=1, padding_mode="reflect", groups=2, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(dense)
        ref.bias.copy_(layer.bias)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(new(x), ref(x)) < 1e-12
        assert rel_err(new(x), layer(x)) > 1e-3


def test_cost_formula():
    spec = ConvSpec.from_module(nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2))
    # depthwise: 8 ch x 2 filters x 9 taps; pointwise: 12 outputs x (4 ch x 2) inputs; 5x5 output
    assert M.cost(spec, (2,), (10, 10)).macs == 25 * (8 * 2 * 9 + 12 * 4 * 2)
    assert M.cost(spec, (2,), (10, 10)).params == 8 * 2 * 9 + 12 * 4 * 2 + 12


def test_energy_target_takes_the_worst_channel():
    layer = nn.Conv2d(4, 16, 3, dtype=torch.float64)
    w = layer.weight.detach()
    new = convfactor.factorize(layer, "depthwise", energy=0.7)
    need = []
    for ch in range(4):
        s2 = torch.linalg.svdvals(slice_of(w, 1, ch)).pow(2)
        need.append(int((s2.cumsum(0) / s2.sum() < 0.7).sum()) + 1)
    assert new.ranks == (max(need),)


@pytest.mark.parametrize("bad", [0, -1, 10, 1.5, "2", (2, 2)])
def test_bad_rank_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="rank"):             # full rank min(16, 9) = 9
        convfactor.factorize(nn.Conv2d(4, 16, 3), "depthwise", rank=bad)


def test_nothing_to_factorize():
    with pytest.raises(UnsupportedLayer, match="nothing to factorize"):
        convfactor.factorize(nn.Conv2d(4, 4, 1), "depthwise", rank=1)          # 1x1: full rank 1
    with pytest.raises(UnsupportedLayer, match="Linear"):
        convfactor.factorize(nn.Linear(4, 4), "depthwise", rank=1)


def test_save_load_round_trip_conv1d(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 5, padding="same", padding_mode="reflect"), nn.ReLU(), nn.Conv1d(8, 8, 3))
    x = torch.randn(2, 4, 16)
    compressed, _ = convfactor.compress(model, [{"op_types": ["Conv1d"], "method": "depthwise", "rank": 2}], x)
    convfactor.save(compressed, tmp_path / "m")
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Conv1d(4, 8, 5, padding="same", padding_mode="reflect"), nn.ReLU(), nn.Conv1d(8, 8, 3))
    assert torch.equal(convfactor.load(tmp_path / "m", fresh)(x), compressed(x))

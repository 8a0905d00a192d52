"""Multi-subspace (ALDS channel-slicing) channel SVD: exact at full rank, error = discarded energy per
slice, cost agrees with FlopCounterMode, and more slices never fit worse at equal total rank."""
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import convfactor
from convfactor.methods import registry
from convfactor.spec.convspec import ConvSpec


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(1, 3), s=st.sampled_from([1, 2, 3]), k=st.sampled_from([1, 3]),
       stride=st.sampled_from([1, 2]), dilation=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2]),
       bias=st.booleans(), dim=st.sampled_from([1, 2, 3]))
def test_exact_at_full_rank_with_every_conv_option(n, c, s, k, stride, dilation, groups, bias, dim):
    torch.manual_seed(0)
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    layer = conv_cls(c * s * groups, 2 * n * groups, k, stride=stride, padding=k // 2, dilation=dilation,
                     groups=groups, bias=bias, dtype=torch.float64)
    m = registry.get("sliced_svd", slices=s)
    assume(m.full_rank(ConvSpec.from_module(layer))[0] > 1)         # rank 1 everywhere: nothing to factorize
    new = convfactor.factorize(layer, m, rank=m.full_rank(ConvSpec.from_module(layer))[0])
    x = torch.randn(2, c * s * groups, *([7] * dim), dtype=torch.float64)
    assert torch.allclose(new(x), layer(x), atol=1e-10)
    assert new.ranks == m.full_rank(ConvSpec.from_module(layer))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), c=st.integers(1, 4), s=st.sampled_from([1, 2, 4]), r=st.integers(1, 12),
       groups=st.sampled_from([1, 2]))
def test_truncation_error_equals_the_discarded_energy_of_every_slice(n, c, s, r, groups):
    layer = nn.Conv2d(c * s * groups, n * groups, 3, groups=groups, dtype=torch.float64)
    m = registry.get("sliced_svd", slices=s)
    spec = ConvSpec.from_module(layer)
    r = min(r, m.full_rank(spec)[0])
    approx = m.reconstruct(m.factorize(layer.weight.detach(), spec, (r,)), spec)
    spectra = m.spectra(layer.weight.detach(), spec)[0]          # (groups * slices, full)
    assert spectra.shape[0] == groups * s
    assert torch.allclose((approx - layer.weight).pow(2).sum(), spectra[:, r:].pow(2).sum(), rtol=1e-9, atol=1e-12)


def test_one_slice_is_channel_svd():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 12, 3, padding=1, dtype=torch.float64)
    spec = ConvSpec.from_module(layer)
    a = registry.get("sliced_svd", slices=1)
    b = registry.get("channel_svd")
    w = layer.weight.detach()
    assert torch.allclose(a.reconstruct(a.factorize(w, spec, (5,)), spec), b.reconstruct(b.factorize(w, spec, (5,)), spec))
    assert a.cost(spec, (5,), (16, 16)) == b.cost(spec, (5,), (16, 16))


@pytest.mark.parametrize("slices,stride,groups", [(2, 1, 1), (4, 2, 1), (2, 1, 2)])
def test_cost_agrees_with_flop_counter(slices, stride, groups):
    layer = nn.Conv2d(16, 24, 3, stride=stride, padding=1, groups=groups)
    new = convfactor.factorize(layer, registry.get("sliced_svd", slices=slices), rank=3)
    x = torch.randn(1, 16, 20, 20)
    with FlopCounterMode(display=False) as fc:
        new(x)
    cost = registry.get("sliced_svd", slices=slices).cost(ConvSpec.from_module(layer), (3,), (20, 20))
    assert cost.macs == fc.get_total_flops() // 2
    assert cost.params == sum(p.numel() for p in new.parameters())


def test_more_slices_fit_a_real_kernel_better_at_nearly_the_same_macs():
    """ALDS's point: at a fixed MACs budget, s slices keep s x the rank (a 3x3 conv's first piece
    dominates the cost), so the error drops on the shipped EDSR's body convs."""
    from convfactor import models
    edsr = models.get("edsr_baseline_x2", pretrained=True)
    layer = edsr.body[3].body[0]
    spec = ConvSpec.from_module(layer)
    w = layer.weight.detach().double()
    errs = []
    for s in (1, 2, 4):
        m = registry.get("sliced_svd", slices=s)
        r = m.ranks_for_macs(spec, 0.25, (64, 64))
        errs.append(float((m.reconstruct(m.factorize(w, spec, r), spec) - w).norm() / w.norm()))
        assert m.cost(spec, r, (64, 64)).macs <= 0.25 * spec.dense_macs((64, 64))
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "2"])
def test_bad_slices_are_refused(bad):
    with pytest.raises(ValueError, match="slices"):
        registry.get("sliced_svd", slices=bad)


def test_slices_that_do_not_divide_the_channels_skip_the_layer():
    with pytest.raises(convfactor.UnsupportedLayer, match="do not divide"):
        registry.get("sliced_svd", slices=3).check(ConvSpec.from_module(nn.Conv2d(8, 8, 3)))
    with pytest.raises(convfactor.UnsupportedLayer, match="Linear"):
        registry.get("sliced_svd").check(ConvSpec.from_module(nn.Linear(8, 8)))


def test_parse_and_key_name_a_configured_method():
    m = registry.parse("sliced_svd:slices=4")
    assert m == registry.get("sliced_svd", slices=4) and m.key() == "sliced_svd:slices=4"
    assert m.changed_options() == {"slices": 4} and registry.get("sliced_svd").changed_options() == {}
    assert registry.parse("sliced_svd").key() == "sliced_svd"
    assert registry.parse("cp:form=folded, n_iter=7") == registry.get("cp", form="folded", n_iter=7)
    for bad, match in (("sliced_svd:slices", "key=value"), ("sliced_svd:nope=1", "unknown option"),
                       ("sliced_svd:slices=0", "slices")):
        with pytest.raises(ValueError, match=match):
            registry.parse(bad)

"""The learned filter basis (Li et al. 2019): math, modules, split choice, sharing, save/load, eq. 12."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file
from torch import nn

import convfactor
from convfactor.spec.convspec import ConvSpec
from convfactor.measure.count import count_params
from convfactor.methods import registry
from convfactor.methods.basis import (IMPLS, Basis, BasisConv2d, basis_regularizer, compression_ratio, divisors,
                                      joint_basis, optimal_splits, share_groups, split_matrix)
from strategies import conv2d_configs, conv2d_grid, input_for, make_layer, refusal, rel_err, shape_spec

BASIS = Basis()


def _block(channels: int, bias: bool) -> nn.Sequential:
    """An SRResNet / EDSR residual block body: two 3x3 convs C->C."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=bias), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1, bias=bias))


# ---------------------------------------------------------------------------------------- paper, Table 2
@pytest.mark.parametrize("channels, p, m, paper_k, paper_pct, base_k", [
    (64, 64, 14, 18, 24.3, 74),      # SRResNet Basis-64-14
    (64, 32, 32, 27, 36.1, 74),      # SRResNet Basis-32-32
    (128, 128, 27, 69, None, 295),   # EDSR-8-128 Basis-128-27
    (128, 128, 40, 102, None, 295),  # EDSR-8-128 Basis-128-40
])
def test_table2_parameters_per_residual_block(channels, p, m, paper_k, paper_pct, base_k):
    """Table 2 counts the conv weights ("Basis-p-m": m basis filters of p channels, s = C/p)."""
    block = _block(channels, bias=False)
    x = torch.randn(1, channels, 8, 8)
    small, report = convfactor.compress(block, [{"method": "basis", "rank": m, "splits": channels // p}], x)
    assert round(count_params(block) / 1000) == base_k
    assert round(count_params(small) / 1000) == paper_k
    assert report.totals()["params_after"] == count_params(small)          # the cost formula agrees
    if paper_pct is not None:
        assert round(100 * count_params(small) / count_params(block), 1) == paper_pct
        assert round(100 * compression_ratio(ConvSpec.from_module(block[0]), m, channels // p), 1) == paper_pct
    # with biases, the counted module and the closed-form cost still agree exactly
    biased = _block(channels, bias=True)
    small_b, rep_b = convfactor.compress(biased, [{"method": "basis", "rank": m, "splits": channels // p}], x)
    assert count_params(small_b) == rep_b.totals()["params_after"] == count_params(small) + 2 * channels


# ---------------------------------------------------------------------------------------- the math
@given(n=st.integers(1, 10), c=st.sampled_from([1, 2, 4, 6, 8]), k=st.integers(1, 3), m=st.integers(1, 40),
       data=st.data())
def test_truncation_error_equals_discarded_energy(n, c, k, m, data):
    layer = nn.Conv2d(c, n, k, dtype=torch.float64)
    spec = ConvSpec.from_module(layer)
    s = data.draw(st.sampled_from(divisors(c)))
    method = Basis(s)
    m = min(m, method.full_rank(spec)[0])
    w = layer.weight.detach()
    approx = method.reconstruct(method.factorize(w, spec, (m,)), spec)
    sv = method.spectra(w, spec)[0][0]
    assert torch.allclose((approx - w).pow(2).sum(), sv[m:].pow(2).sum(), rtol=1e-9, atol=1e-12)
    # the spectrum is the one of the (N s) x (p k) matrix of splits
    assert torch.allclose(sv, torch.linalg.svdvals(w.reshape(n * s, -1)))


def test_splits_1_is_channel_svd():
    layer = nn.Conv2d(12, 10, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), dtype=torch.float64)
    spec = ConvSpec.from_module(layer)
    svd = registry.get("channel_svd")
    a = Basis(splits=1).factorize(layer.weight.detach(), spec, (5,))
    b = svd.factorize(layer.weight.detach(), spec, (5,))
    assert torch.equal(a["basis"], b["first"]) and torch.equal(a["coeff"], b["second"])
    x = input_for(layer)
    new_a = convfactor.factorize(layer, "basis", rank=5, splits=1)
    new_b = convfactor.factorize(layer, "channel_svd", rank=5)
    with torch.no_grad():
        assert torch.allclose(new_a(x), new_b(x), rtol=0, atol=1e-12)
    assert Basis(splits=1).cost(spec, (5,), (9, 9)) == svd.cost(spec, (5,), (9, 9))


def test_splits_C_is_channelwise_2d_decomposition():
    layer = nn.Conv2d(6, 5, (3, 2), padding=1, dtype=torch.float64)
    spec = ConvSpec.from_module(layer)
    assert Basis(6).full_rank(spec) == (6,)                     # at most kh*kw 2-D filters
    new = convfactor.factorize(layer, "basis", rank=6, splits=6)
    assert new.basis.weight.shape == (6, 1, 3, 2) and new.combine.weight.shape == (5, 36, 1, 1)
    x = input_for(layer)
    with torch.no_grad():
        assert rel_err(new(x), layer(x)) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=20)
@given(data=st.data())
def test_every_impl_and_split_is_exact_with_all_conv_options(impl, data):
    layer = make_layer(data.draw(conv2d_configs(method="basis")))
    spec = ConvSpec.from_module(layer)
    s = data.draw(st.sampled_from(divisors(spec.in_per_group)))
    full = Basis(s).full_rank(spec)[0]                  # may be 1 at this s: the layer is judged at s*
    new = convfactor.factorize(layer, "basis", rank=full, splits=s, impl=impl)
    assert new.options == {"splits": s, "impl": impl}
    x = input_for(layer)
    with torch.no_grad():
        assert rel_err(new(x), layer(x)) <= 1e-9


def test_refusal_is_judged_at_the_optimal_split_whatever_the_given_splits():
    """A layer is refused exactly when its full rank at s* is 1 (a single input channel per group with
    one output or a 1x1 kernel, or a 1x1 conv to one output whose s* is 1); a given ``splits`` or
    ``impl`` neither adds a refusal nor lifts one."""
    refused = []
    for shape in conv2d_grid():
        groups, cin, cout, kernel = shape
        spec = shape_spec(shape)
        expected = BASIS.full_rank(spec)[0] == 1
        for s in divisors(spec.in_per_group):
            reason = refusal(Basis(s), shape)
            assert (reason is not None) == expected, (shape, s, reason)
            if expected:
                assert reason == "basis: full rank is (1,), nothing to factorize", (shape, s)
        if expected:
            refused.append(shape)
            assert spec.in_per_group == 1 or kernel == (1, 1), shape
            layer = nn.Conv2d(cin, cout, kernel, groups=groups)
            for impl in IMPLS:
                with pytest.raises(convfactor.UnsupportedLayer, match="nothing to factorize"):
                    convfactor.factorize(layer, "basis", rank=1, splits=spec.in_per_group, impl=impl)
    # every 1 -> 1 conv, whatever its kernel, and 1x1 convs with one input or output per group, e.g.
    assert {(1, 1, 1, (3, 3)), (1, 1, 8, (1, 1)), (1, 7, 1, (1, 1)), (2, 2, 2, (1, 1))} <= set(refused)
    assert (1, 4, 1, (1, 1)) not in refused and (2, 2, 2, (1, 2)) not in refused    # s* = 2; N s* = 2


@pytest.mark.parametrize("impl", IMPLS)
def test_channels_last_inputs(impl):
    layer = nn.Conv2d(8, 6, 3, padding=1, padding_mode="circular", dtype=torch.float64)
    new = convfactor.factorize(layer, "basis", rank=Basis(4).full_rank(ConvSpec.from_module(layer)), splits=4,
                               impl=impl).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 7, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_err(new(x), layer(x)) < 1e-12


@pytest.mark.parametrize("layer", [nn.Conv1d(6, 8, 3, stride=2, padding=2, padding_mode="reflect", dtype=torch.float64),
                                   nn.Conv3d(4, 6, (3, 1, 2), padding="same", dtype=torch.float64)])
def test_conv1d_and_conv3d(layer):
    spec = ConvSpec.from_module(layer)
    for s in divisors(spec.in_channels):
        new = convfactor.factorize(layer, "basis", rank=Basis(s).full_rank(spec), splits=s)
        x = input_for(layer, size=(9, 8, 7))
        with torch.no_grad():
            assert rel_err(new(x), layer(x)) < 1e-10
    with pytest.raises(ValueError, match="conv3d"):
        convfactor.factorize(layer, "basis", rank=1, impl="conv3d")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("s", [1, 2, 6])
def test_cost_matches_flop_counter_and_params(impl, s):
    layer = nn.Conv2d(12, 16, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    spec = ConvSpec.from_module(layer)
    new = convfactor.factorize(layer, "basis", rank=3, splits=s, impl=impl)
    counted = convfactor.count(new, torch.randn(1, 12, 20, 18))
    cost = registry.get("basis", splits=s).cost(spec, (3,), (20, 18))
    assert counted["macs"] == cost.macs and counted["params"] == cost.params == count_params(new)


# ---------------------------------------------------------------------------------------- choosing s and m
@pytest.mark.parametrize("c, n, k", [(64, 64, 9), (128, 128, 9), (256, 12, 9), (96, 12, 9), (64, 64, 1),
                                     (48, 16, 25), (7, 30, 9), (1, 8, 9)])
def test_optimal_splits_is_the_best_divisor_near_eq7(c, n, k):
    spec = ConvSpec.from_module(nn.Conv2d(c, n, int(math.isqrt(k))))
    s = optimal_splits(spec)
    ratios = {d: compression_ratio(spec, 1, d) for d in divisors(c)}
    assert ratios[s] == min(ratios.values())
    star = math.sqrt(c * k / n)                                  # eq. 7
    lower = max([d for d in divisors(c) if d <= star], default=1)
    upper = min([d for d in divisors(c) if d >= star], default=c)
    assert s in (lower, upper)


def test_narrow_output_layer_c_much_greater_than_n():
    """DenseNet-style C >> N: channel SVD cannot go below rank N; the basis splits the input."""
    layer = nn.Conv2d(96, 12, 3, padding=1, dtype=torch.float64)
    spec = ConvSpec.from_module(layer)
    s = optimal_splits(spec)
    assert s > 1 and BASIS.full_rank(spec)[0] > spec.out_channels
    m = BASIS.resolve_ranks(spec, layer.weight, macs_ratio=0.5, input_size=(8, 8))[0]
    assert BASIS.cost(spec, (m,), (8, 8)).macs <= 0.5 * spec.dense_macs((8, 8))
    assert BASIS.cost(spec, (m,), ()).params < spec.dense_params() / 2
    new = convfactor.factorize(layer, "basis", rank=BASIS.full_rank(spec))
    x = input_for(layer)
    with torch.no_grad():
        assert rel_err(new(x), layer(x)) < 1e-10


def test_targets_respect_the_given_splits():
    layer = nn.Conv2d(32, 32, 3, padding=1, dtype=torch.float64)
    spec = ConvSpec.from_module(layer)
    for s in (1, 2, 8):
        new = convfactor.factorize(layer, "basis", macs_ratio=0.3, splits=s, input_size=(16, 16))
        assert new.options["splits"] == s
        m = new.ranks[0]
        assert Basis(s).cost(spec, (m,), (16, 16)).macs <= 0.3 * spec.dense_macs((16, 16))
        assert Basis(s).cost(spec, (m + 1,), (16, 16)).macs > 0.3 * spec.dense_macs((16, 16))
        new = convfactor.factorize(layer, "basis", energy=0.8, splits=s)
        sv = Basis(s).spectra(layer.weight.detach(), spec)[0][0].pow(2)
        kept = sv[: new.ranks[0]].sum() / sv.sum()
        assert kept >= 0.8 and sv[: new.ranks[0] - 1].sum() / sv.sum() < 0.8
    # rank limits follow the given split: 50 <= 72 at s* = 4, but > 36 = p k at s = 8
    assert BASIS.full_rank(spec) == (72,) and convfactor.factorize(layer, "basis", rank=50).ranks == (50,)
    with pytest.raises(ValueError, match=r"\[1, 36\]"):
        convfactor.factorize(layer, "basis", rank=50, splits=8)


@pytest.mark.parametrize("bad", [{"splits": 3}, {"splits": 0}, {"splits": 2.0}, {"impl": "fft"}, {"rank": 10_000},
                                 {"share": "stage"}, {"share": "block", "rank": 10_000}, {"share": [["0"], "2"]}])
def test_bad_config_fails_before_anything_is_written(bad, tmp_path):
    block = _block(8, bias=True)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    rule = {"method": "basis", "rank": 2, **bad}
    with pytest.raises(ValueError, match="splits|impl|out of range|share"):
        convfactor.compress(block, [rule], torch.randn(1, 8, 6, 6))
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())


# ---------------------------------------------------------------------------------------- sharing
def test_share_needs_compress():
    with pytest.raises(ValueError, match="compress rule"):
        convfactor.factorize(nn.Conv2d(8, 8, 3), "basis", rank=2, share="block")


def test_share_groups_definitions():
    resnet = ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2", "layer2.0.conv1", "fc"]
    assert share_groups(resnet, "block") == [resnet[0:2], resnet[2:4], [resnet[4]], ["fc"]]
    assert share_groups(resnet, "group") == [resnet[0:4], [resnet[4]], ["fc"]]
    assert share_groups(resnet, "network") == [resnet]
    edsr = ["head", "body.0.body.0", "body.0.body.2", "body.1.body.0", "body.1.body.2", "body.2"]
    assert share_groups(edsr, "block") == [["head"], edsr[1:3], edsr[3:5], ["body.2"]]
    assert share_groups(edsr, "group") == [["head"], edsr[1:]]
    assert share_groups(resnet, [["layer1.*"], ["fc", "layer2.0.conv1"]]) == [resnet[:4], resnet[4:]]
    assert share_groups(resnet, [["layer1.0.*"]]) == [resnet[:2], [resnet[2]], [resnet[3]], [resnet[4]], ["fc"]]
    with pytest.raises(ValueError, match="matches none"):
        share_groups(resnet, [["layer9.*"]])
    with pytest.raises(ValueError, match="share"):
        share_groups(resnet, "stage")


def test_block_sharing_is_the_joint_svd_and_its_error_is_the_discarded_energy():
    block = _block(16, bias=True).double()
    small, _ = convfactor.compress(block, [{"method": "basis", "rank": 20, "splits": 2, "share": "block"}])
    a, b = small[0], small[2]
    assert isinstance(a, BasisConv2d) and a.basis.weight is b.basis.weight
    joint = torch.cat([split_matrix(block[i].weight.detach(), 2) for i in (0, 2)])
    sv = torch.linalg.svdvals(joint)
    err = sum((BASIS.reconstruct(BASIS.factors_of(new), new.spec) - block[i].weight).pow(2).sum()
              for i, new in ((0, a), (2, b)))
    assert torch.allclose(err, sv[20:].pow(2).sum(), rtol=1e-9)
    # full joint rank reproduces both convs; biases stay per layer
    full, _ = convfactor.compress(block, [{"method": "basis", "rank": 64, "splits": 2, "share": "block"}])
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(full(x), block(x)) < 1e-10
    assert full[0].combine.bias is not full[2].combine.bias


def test_network_sharing_uses_a_channel_prefix_and_refinement_helps():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                        nn.Conv2d(16, 4, 1)).double()
    rule = {"op_types": ["Conv2d"], "exclude_op_names": ["3"], "method": "basis", "rank": 6, "splits": 2,
            "share": "network"}
    small, report = convfactor.compress(net, [rule], torch.randn(1, 8, 6, 6, dtype=torch.float64))
    shared = small[0].basis.weight
    assert shared.shape == (6, 8, 3, 3) and small[1].basis.weight is shared and small[2].basis.weight is shared
    assert small[0].basis.p == small[1].basis.p == 4 and small[2].basis.p == 8     # prefix of 4 of the 8 channels
    assert small[0].options["basis_channels"] == 8 and "basis_channels" not in small[2].options
    assert report.totals()["params_after"] == count_params(small) - count_params(net[3])
    # the refined prefix basis is no worse than its zero-padded SVD initialization
    mats = [split_matrix(net[i].weight.detach(), 2) for i in range(3)]
    widths = [4, 4, 8]

    def error(refine):
        basis, coeffs = joint_basis(mats, widths, (3, 3), 6, refine=refine)
        return sum((mat - coeff @ basis[:, :p].reshape(6, -1)).pow(2).sum()
                   for mat, p, coeff in zip(mats, widths, coeffs))
    e0, e1, e10 = error(0), error(1), error(10)
    assert e10 <= e1 + 1e-12 <= e0 + 2e-12 and e10 < e0


def test_shared_basis_round_trips_through_save_load(tmp_path):
    from convfactor import models
    model = models.get("resnet20").eval()
    x = torch.randn(2, 3, 16, 16)
    for share in ("block", "network"):
        small, report = convfactor.compress(model, [{"op_names": ["layer*"], "method": "basis", "rank": 6,
                                                     "splits": 2, "share": share}], x)
        n_bases = len({id(m.basis.weight) for m in small.modules() if isinstance(m, BasisConv2d)})
        assert n_bases == (9 if share == "block" else 1)
        out = tmp_path / share
        convfactor.save(small, out)
        stored = load_file(str(out / "model.safetensors"))
        assert sum(k.endswith("basis.weight") for k in stored) == n_bases           # one stored tensor per basis
        loaded = convfactor.load(out, models.get("resnet20")).eval()
        layers = [m for m in loaded.modules() if isinstance(m, BasisConv2d)]
        assert len({id(m.basis.weight) for m in layers}) == n_bases
        assert count_params(loaded) == count_params(small) < count_params(model)
        with torch.no_grad():
            assert torch.equal(loaded(x), small(x))
            layers[0].basis.weight.add_(1.0)                                         # still one tensor after load
        if share == "network":
            assert all(torch.equal(m.basis.weight, layers[0].basis.weight) for m in layers)


def test_recipe_keeps_impl_and_splits(tmp_path):
    block = _block(8, bias=True)
    small, _ = convfactor.compress(block, [{"method": "basis", "rank": 3, "splits": 4, "impl": "grouped"}])
    convfactor.save(small, tmp_path / "m")
    loaded = convfactor.load(tmp_path / "m", _block(8, bias=True))
    assert loaded[0].options == {"splits": 4, "impl": "grouped"} and loaded[0].basis.impl == "grouped"
    assert convfactor.factorize(block[0], "basis", rank=2).options["impl"] == "auto"
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_exports_and_compiles_to_onnx_ops(tmp_path):
    onnx = pytest.importorskip("onnx")
    layer = nn.Conv2d(8, 8, 3, padding=1)
    new = convfactor.factorize(layer, "basis", rank=4, splits=2).eval()
    torch.onnx.export(new, (torch.randn(1, 8, 6, 6),), str(tmp_path / "b.onnx"), dynamo=False)
    graph = onnx.load(str(tmp_path / "b.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert sum(math.prod(t.dims) for t in graph.initializer) < layer.weight.numel()   # no dense copy exported
    assert "Conv" in ops and ops <= {"Conv", "Reshape", "Constant", "Shape", "Gather", "Concat", "Unsqueeze",
                                     "Mul", "Slice", "Cast", "Div"}


# ---------------------------------------------------------------------------------------- eq. 12
def test_regularizer_is_the_weight_error_and_trains_towards_the_original(tmp_path):
    block = _block(8, bias=True).double()
    small, _ = convfactor.compress(block, [{"method": "basis", "rank": 5, "splits": 2}])
    expected = sum((BASIS.reconstruct(BASIS.factors_of(small[i]), small[i].spec) - block[i].weight).pow(2).sum()
                   for i in (0, 2))
    reg = basis_regularizer(small, block, gamma=0.5)
    assert torch.allclose(reg, 0.5 * expected)
    by_dict = basis_regularizer(small, {"0": block[0].weight, "2": block[2].weight}, gamma=0.5)
    assert torch.allclose(by_dict, reg)
    assert torch.allclose(basis_regularizer(small, gamma=0.5), reg)      # the kept reference_weight buffers
    assert torch.equal(small[0].reference_weight, block[0].weight) and "0.reference_weight" not in small.state_dict()
    # truncated SVD is the optimum: a gradient step away from it cannot lower the penalty (zero gradient)
    reg.backward()
    grads = [p.grad for p in small.parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) < 1e-8
    # from a perturbed start, gradient descent on the penalty lowers it
    with torch.no_grad():
        for p in small.parameters():
            p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.SGD(small.parameters(), lr=1e-3)
    start = basis_regularizer(small, block).item()
    for _ in range(20):
        opt.zero_grad()
        loss = basis_regularizer(small, block)
        loss.backward()
        opt.step()
    assert basis_regularizer(small, block).item() < start
    full, _ = convfactor.compress(block, [{"method": "basis", "rank": 16, "splits": 2}])
    assert basis_regularizer(full, block).item() < 1e-20
    with pytest.raises(ValueError, match="no basis layers"):
        basis_regularizer(block, block)
    convfactor.save(small, tmp_path / "m")
    loaded = convfactor.load(tmp_path / "m", _block(8, bias=True).double())
    with pytest.raises(ValueError, match="no reference weight"):
        basis_regularizer(loaded)
    assert torch.allclose(basis_regularizer(loaded, block), basis_regularizer(small, block))
    assert convfactor.basis_regularizer is basis_regularizer

"""ConvTranspose1d/2d/3d: channel SVD and Tucker-2 are exact at full rank with every option, their cost
formulas agree with FlopCounterMode, and every other method refuses them with a reason."""
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import convfactor
from convfactor.methods import registry
from convfactor.spec.convspec import ConvSpec, UnsupportedLayer
from strategies import accepted_shapes, check_exact, refusal, rel_err, shape_grid

SUPPORTED = ["channel_svd", "tucker2"]
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def transposed_grid(dim: int = 2):
    """The shapes :func:`transposed_configs` draws."""
    return shape_grid(dim, (1, 2, 3), 4, 4, 4)


@st.composite
def transposed_configs(draw, dim: int = 2, method: str | None = None):
    """ConvTranspose layers with every option; output_padding < max(stride, dilation) per axis (torch's rule).
    With ``method``, only the shapes it takes."""
    if method is None:
        groups = draw(st.sampled_from([1, 2, 3]))
        cin, cout = groups * draw(st.integers(1, 4)), groups * draw(st.integers(1, 4))
        kernel = tuple(draw(st.integers(1, 4)) for _ in range(dim))
    else:
        groups, cin, cout, kernel = draw(st.sampled_from(accepted_shapes(method, transposed_grid(dim), True)))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding = tuple(draw(st.integers(0, (d * (k - 1)) // 2 + 1)) for k, d in zip(kernel, dilation))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    return dict(in_channels=cin, out_channels=cout, kernel_size=kernel, stride=stride, padding=padding,
                output_padding=output_padding, dilation=dilation, groups=groups, bias=draw(st.booleans()))


def _layer(cfg: dict, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return TRANSPOSED[len(cfg["kernel_size"])](**cfg, dtype=dtype)


def _input(layer: nn.Module, size=(5, 4, 3), batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, layer.in_channels, *size[:len(layer.kernel_size)], generator=g, dtype=layer.weight.dtype)


@pytest.mark.parametrize("method", SUPPORTED)
@given(data=st.data())
def test_full_rank_reproduces_convtranspose2d(method, data):
    layer = _layer(data.draw(transposed_configs(2, method=method)))
    check_exact(layer, method, _input(layer), 1e-9)


@pytest.mark.parametrize("method", SUPPORTED)
@pytest.mark.parametrize("dim", [1, 3])
def test_full_rank_reproduces_convtranspose1d_3d(method, dim):
    for cfg in ({"kernel_size": (3,) * dim, "stride": (2,) * dim, "padding": (1,) * dim, "output_padding": (1,) * dim,
                 "dilation": (1,) * dim, "groups": 2},
                {"kernel_size": (2, 3, 1)[:dim], "stride": (3, 1, 2)[:dim], "padding": (0, 1, 0)[:dim],
                 "output_padding": (2, 0, 1)[:dim], "dilation": (2, 1, 1)[:dim], "groups": 1}):
        layer = _layer(dict(in_channels=4, out_channels=6, bias=True, **cfg))
        check_exact(layer, method, _input(layer), 1e-9)


@pytest.mark.parametrize("dim", [1, 2])
def test_supported_methods_refuse_only_a_convtranspose_with_nothing_to_factorize(dim):
    """The transposed weight is (C, N/g, *k): channel SVD's per-group matrix is (C/g) x (N/g kv), and
    Tucker-2 has that and the (N/g) x (C/g kv) unfolding.  A layer is refused, with the reason, exactly
    when these are vectors (all of them, for Tucker-2), over every shape the property test could draw."""
    for shape in transposed_grid(dim):
        groups, cin, cout, kernel = shape
        c, n, kv = cin // groups, cout // groups, math.prod(kernel)
        rows_one, cols_one = min(c, n * kv) == 1, min(n, c * kv) == 1
        assert refusal("channel_svd", shape, transposed=True) == (
            "channel_svd: full rank is (1,), nothing to factorize" if rows_one else None), shape
        assert refusal("tucker2", shape, transposed=True) == (
            "tucker2: full rank is (1, 1), nothing to factorize" if rows_one and cols_one else None), shape


@pytest.mark.parametrize("method", SUPPORTED)
def test_pieces_are_a_pointwise_conv_and_a_convtranspose_with_every_option(method):
    layer = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, output_padding=1, dilation=2, groups=2)
    new = convfactor.factorize(layer, method, rank=2)
    kinds = [type(p) for p in new]
    assert kinds.count(nn.ConvTranspose2d) == 1 and kinds[0] is nn.Conv2d          # the channel mix runs first
    spatial = next(p for p in new if isinstance(p, nn.ConvTranspose2d))
    for attr in ("kernel_size", "stride", "padding", "output_padding", "dilation", "groups"):
        assert getattr(spatial, attr) == getattr(layer, attr), attr
    assert isinstance(new[-1].bias, torch.Tensor)


@pytest.mark.parametrize("method", SUPPORTED)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_cost_formula_matches_flop_counter(method, dim):
    cfg = dict(in_channels=12, out_channels=8, kernel_size=(4, 3, 2)[:dim], stride=(2, 3, 1)[:dim],
               padding=(1, 1, 0)[:dim], output_padding=(1, 0, 0)[:dim], dilation=(1, 2, 1)[:dim], groups=2, bias=True)
    layer = _layer(cfg, dtype=torch.float32)
    m = registry.get(method)
    spec = ConvSpec.from_module(layer)
    ranks = m.scaled_ranks(spec, 0.5)
    new = convfactor.factorize(layer, method, rank=ranks)
    x = _input(layer, size=(7, 6, 5), batch=1)
    counted = convfactor.count(new, x)
    cost = m.cost(spec, ranks, tuple(x.shape[2:]))
    assert counted["macs"] == cost.macs and counted["params"] == cost.params
    dense = convfactor.count(layer, x)
    assert dense["macs"] == spec.dense_macs(tuple(x.shape[2:])) and dense["params"] == spec.dense_params()


@pytest.mark.parametrize("method", SUPPORTED)
def test_macs_ratio_target_is_met_and_factors_read_back(method):
    layer = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1, dtype=torch.float64)
    m = registry.get(method)
    spec = ConvSpec.from_module(layer)
    new = convfactor.factorize(layer, method, macs_ratio=0.4, input_size=(8, 8))
    assert m.cost(spec, new.ranks, (8, 8)).macs <= 0.4 * spec.dense_macs((8, 8))
    assert convfactor.count(new, torch.randn(1, 32, 8, 8, dtype=torch.float64))["macs"] <= 0.4 * spec.dense_macs((8, 8))
    factors = m.factorize(layer.weight.detach(), spec, new.ranks)
    dense = m.reconstruct(factors, spec)
    assert dense.shape == layer.weight.shape
    assert torch.allclose(m.reconstruct(m.factors_of(new), spec), dense, atol=1e-12)


def test_channel_svd_error_is_the_discarded_energy_of_the_transposed_weight():
    # Eckart-Young on the weight's own layout: per group (C/g, N/g * k) with rows = input channels
    layer = nn.ConvTranspose2d(6, 8, 3, stride=2, groups=2, dtype=torch.float64)
    m = registry.get("channel_svd")
    spec = ConvSpec.from_module(layer)
    assert m.full_rank(spec) == (3,)
    w = layer.weight.detach()
    s = torch.linalg.svdvals(w.reshape(2, 3, -1))
    approx = m.reconstruct(m.factorize(w, spec, (2,)), spec)
    assert torch.isclose((approx - w).pow(2).sum(), s[:, 2:].pow(2).sum(), rtol=1e-9)


def test_every_other_method_refuses_a_convtranspose_with_a_reason():
    for layer in (nn.ConvTranspose2d(8, 8, 3, stride=2), nn.ConvTranspose2d(8, 8, 1)):
        spec = ConvSpec.from_module(layer)
        for name in registry.available():
            m = registry.get(name)
            if name in SUPPORTED or (name == "linear_svd" and spec.is_pointwise):
                m.check(spec)
                continue
            if name == "linear_svd":                    # a channel SVD restricted to 1x1 kernels
                with pytest.raises(UnsupportedLayer, match="not 1x1"):
                    m.check(spec)
                continue
            with pytest.raises(UnsupportedLayer, match="ConvTranspose2d is not supported"):
                m.check(spec)
            with pytest.raises(UnsupportedLayer):
                convfactor.factorize(layer, name, rank=2)


def test_linear_svd_on_a_strided_pointwise_convtranspose_is_exact():
    layer = nn.ConvTranspose2d(6, 4, 1, stride=2, output_padding=1, dtype=torch.float64)
    new = convfactor.factorize(layer, "linear_svd", rank=4)
    x = _input(layer)
    assert rel_err(new(x), layer(x)) <= 1e-9


def test_data_aware_fitting_refuses_a_convtranspose():
    layer = nn.ConvTranspose2d(4, 6, 3, stride=2, dtype=torch.float64)
    with pytest.raises(UnsupportedLayer, match="data-aware fitting: ConvTranspose"):
        convfactor.factorize(layer, "channel_svd", rank=2, calibration=[_input(layer)])


class _Decoder(nn.Module):
    """A small U-Net style decoder: a strided conv down, ConvTranspose up, a skip connection."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1)
        self.up1d = nn.ConvTranspose2d(6, 6, 3, padding=1, groups=2)
        self.head = nn.Conv2d(9, 3, 1)

    def forward(self, x):
        y = self.up1d(torch.relu(self.up(torch.relu(self.down(x)))))
        return self.head(torch.cat([x, y], 1))


@pytest.mark.parametrize("method", SUPPORTED)
def test_compress_a_decoder_exact_at_full_rank_and_save_load_round_trips(method, tmp_path):
    torch.manual_seed(0)
    model = _Decoder().double().eval()
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64)
    m = registry.get(method)
    rules = [{"op_names": ["up"], "method": method,
              "rank": m.full_rank(ConvSpec.from_module(model.up))}]
    compressed, report = convfactor.compress(model, rules, x)
    assert {L.name for L in report.compressed} == {"up"}
    with torch.no_grad():
        assert rel_err(compressed(x), model(x)) <= 1e-9
    assert report.layers[0].macs_before == ConvSpec.from_module(model.up).dense_macs((5, 6))
    low, report = convfactor.compress(model, {"op_types": ["ConvTranspose2d"], "method": method, "macs_ratio": 0.5}, x)
    assert {L.name for L in report.compressed} == {"up", "up1d"}
    path = convfactor.save(low, tmp_path / "out")
    recipe = json.loads((path / "recipe.json").read_text())
    assert recipe["layers"]["up"]["spec"]["transposed"] is True
    loaded = convfactor.load(path, model)
    with torch.no_grad():
        assert torch.equal(loaded(x), low(x))


def test_plan_and_inspect_see_the_convtranspose_layers():
    torch.manual_seed(0)
    model = _Decoder().double().eval()
    x = torch.randn(1, 3, 10, 12, dtype=torch.float64)
    facts = {f["name"]: f for f in convfactor.inspect_model(model, x)}
    assert facts["up"]["macs"] == ConvSpec.from_module(model.up).dense_macs((5, 6))
    assert facts["up"]["full_rank"] == 8                       # rows = the 8 input channels
    p = convfactor.plan(model, x, target="macs=60%", method="tucker2")
    assert "up" in {L.name for L in p.compressed}
    compressed, _ = p.apply(model, x)
    assert convfactor.count(compressed, x)["macs"] == pytest.approx(p.summary["macs_after"], rel=1e-9)

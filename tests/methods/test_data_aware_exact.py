"""Data-aware fitting: exact at full rank on every shape, never worse than weight-only on held-out
inputs (issue 14, "Wrong numbers")."""
import warnings

import pytest
import torch
from torch import nn

import convfactor
from convfactor.methods import data_aware as da
from convfactor.methods import registry
from convfactor.spec.convspec import ConvSpec, UnsupportedLayer
from strategies import rel_err

#: every method data-aware fitting handles (TT's module is not a chain of convs)
METHODS = [m for m in registry.available() if m != "tt"]


def _low_rank_inputs(n, c, size, dim, seed):
    """``(n, c, size, size)`` inputs whose channels span only ``dim`` directions (plus an offset)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(c, dim, generator=g, dtype=torch.float64)
    z = torch.randn(n, dim, size, size, generator=g, dtype=torch.float64)
    return torch.einsum("cd,bdhw->bchw", basis, z) + 0.5


def _general_inputs(n, c, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g, dtype=torch.float64)


SHAPES = {"expanding_1x1": dict(c=6, n=20, k=1, stride=1),                        # C < N
          "strided_3x3": dict(c=4, n=24, k=3, stride=2, padding=1),                 # C k^2 > N
          "grouped_3x3": dict(c=8, n=12, k=3, stride=1, padding=1, groups=2)}

#: the (method, shape) pairs a method must refuse, with the words of its reason; every other pair must be exact
REFUSED = {("depthwise", "expanding_1x1"): r"depthwise: full rank is \(1,\), nothing to factorize",
           ("linear_svd", "strided_3x3"): r"linear_svd: kernel \(3, 3\) is not 1x1",
           ("linear_svd", "grouped_3x3"): r"linear_svd: kernel \(3, 3\) is not 1x1",
           ("lowrank_sparse", "grouped_3x3"): "lowrank_sparse: groups=2 is not supported"}


def _shape_layer(shape: str) -> nn.Conv2d:
    torch.manual_seed(0)
    d = SHAPES[shape]
    return nn.Conv2d(d["c"], d["n"], d["k"], stride=d["stride"], padding=d.get("padding", 0),
                     groups=d.get("groups", 1), dtype=torch.float64)


def _calibration(c: int) -> list[torch.Tensor]:
    """Inputs spanning 2 of the ``c`` channel directions at few positions."""
    return [_low_rank_inputs(2, c, 3, 2, seed) for seed in (1, 2)]


@pytest.mark.parametrize("name, shape", [(m, s) for m in METHODS for s in SHAPES if (m, s) not in REFUSED])
def test_full_rank_is_exact_on_held_out_inputs(name, shape):
    """Calibration inputs spanning 2 of the channel directions at few positions: the response fit
    cannot see most of the layer, and at full rank it must still reproduce it everywhere."""
    layer = _shape_layer(shape)
    c = layer.in_channels
    new = convfactor.factorize(layer, name, rank=registry.get(name).full_rank(ConvSpec.from_module(layer)),
                               calibration=_calibration(c))
    held_out = _general_inputs(3, c, 7, 9)
    with torch.no_grad():
        assert rel_err(new(held_out), layer(held_out)) <= 1e-9
    assert da.fit_note(new) is None


@pytest.mark.parametrize("name, shape", sorted(REFUSED))
def test_the_refused_pairs_say_why(name, shape):
    """The pairs left out above are refused by the method itself (before any fitting), with its reason."""
    layer = _shape_layer(shape)
    with pytest.raises(UnsupportedLayer, match=REFUSED[name, shape]):
        registry.get(name).check(ConvSpec.from_module(layer))
    with pytest.raises(UnsupportedLayer, match=REFUSED[name, shape]):
        convfactor.factorize(layer, name, rank=1, calibration=_calibration(layer.in_channels))


def test_full_rank_is_exact_on_resnet18_expanding_downsample_convs():
    """torchvision ResNet-18's 1x1 downsample convs (C < N), calibrated on fewer positions than
    channels (held-out error was 0.066-0.12 before, calibration error <= 1e-11)."""
    thirdparty = pytest.importorskip("thirdparty")
    torchvision = thirdparty.load("torchvision")
    from convfactor.compression.calibration import collect_inputs
    torch.manual_seed(0)
    model = torchvision.models.resnet18().double().eval()
    names = ["layer3.0.downsample.0", "layer4.0.downsample.0"]
    g = torch.Generator().manual_seed(1)
    calibration = collect_inputs(model, names, [torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)])
    held_out = collect_inputs(model, names, [torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)])
    for name in names:
        layer = model.get_submodule(name)
        full = registry.get("channel_svd").full_rank(ConvSpec.from_module(layer))
        for method in ("channel_svd", "tucker2"):
            rank = full if method == "channel_svd" else registry.get(method).full_rank(ConvSpec.from_module(layer))
            new = convfactor.factorize(layer, method, rank=rank, calibration=calibration[name])
            x = held_out[name]
            with torch.no_grad():
                assert rel_err(new(x), layer(x)) <= 1e-9, (name, method)


def test_response_fit_keeps_weight_only_directions_the_data_leaves_out():
    """Below full rank, the last piece keeps its weight-only map on every direction of its input the
    calibration never excites: the anchored least squares change only what the data determines
    (before, those directions were zeroed, which is what broke held-out inputs)."""
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 10, 1, bias=False, dtype=torch.float64)
    calibration = _low_rank_inputs(4, 6, 4, 2, 1) - 0.5               # exactly a 2-dim input subspace
    weight_only = convfactor.factorize(layer, "tucker2", rank=(5, 5))
    fitted = convfactor.factorize(layer, "tucker2", rank=(5, 5), calibration=calibration, holdout=0)
    prefix = nn.Sequential(*list(weight_only)[:2])
    with torch.no_grad():
        assert torch.equal(nn.Sequential(*list(fitted)[:2])(calibration), prefix(calibration))   # only the last moved
        design = prefix(calibration).movedim(1, -1).reshape(-1, 5)           # what the last piece sees
    unseen = torch.linalg.svd(design, full_matrices=True).Vh[2:]               # (3, 5): never excited
    last_fit, last_weight_only = (m[2].weight.detach().reshape(10, 5) for m in (fitted, weight_only))
    assert rel_err(last_fit @ unseen.T, last_weight_only @ unseen.T) < 1e-6
    with torch.no_grad():
        assert rel_err(fitted(calibration), layer(calibration)) < 0.5 * rel_err(weight_only(calibration),
                                                                                layer(calibration))


def _correlated(n, c, size, seed):
    g = torch.Generator().manual_seed(100)
    mix = torch.randn(c, c, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -1.5, c,
                                                                                          dtype=torch.float64))
    z = torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.einsum("dc,bchw->bdhw", mix, z)


def test_falls_back_to_weight_only_when_the_held_out_part_disagrees():
    """Calibration whose last sample (the held-out part) comes from another distribution than the rest:
    the response fit is worse there, so the weight-only fit is returned, with a note and a warning."""
    torch.manual_seed(0)
    layer = nn.Conv2d(12, 16, 3, padding=1, dtype=torch.float64)
    calibration = [_low_rank_inputs(4, 12, 6, 2, 1), _general_inputs(1, 12, 6, 2)]
    weight_only = convfactor.factorize(layer, "channel_svd", rank=3)
    with pytest.warns(da.DataAwareFallbackWarning, match="weight-only"):
        fitted = convfactor.factorize(layer, "channel_svd", rank=3, calibration=calibration)
    note = da.fit_note(fitted)
    assert note is not None and "held-out" in note
    x = _general_inputs(2, 12, 6, 3)
    with torch.no_grad():
        assert torch.equal(fitted(x), weight_only(x))
    # the same data with the check disabled gives the response fit, which is worse on such inputs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unchecked = convfactor.factorize(layer, "channel_svd", rank=3, calibration=calibration, holdout=0)
    assert da.fit_note(unchecked) is None
    with torch.no_grad():
        assert rel_err(unchecked(x), layer(x)) > rel_err(weight_only(x), layer(x))


@pytest.mark.parametrize("name", ["tucker2", "channel_svd", "spatial_svd", "cp"])
def test_never_worse_than_weight_only_on_held_out_inputs_with_one_calibration_sample(name):
    """One small calibration sample (fewer positions than the last piece has unknowns: the setting
    where Tucker-2 did 2.77 against 0.97 weight-only): the held-out crop chooses the ridge, and the
    result beats weight-only on fresh inputs from the same distribution."""
    torch.manual_seed(0)
    layer = nn.Conv2d(12, 32, 3, padding=1, dtype=torch.float64)
    calibration = _correlated(1, 12, 5, 1)
    kwargs = dict(macs_ratio=0.5, input_size=(5, 5))
    weight_only = convfactor.factorize(layer, name, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", da.DataAwareFallbackWarning)
        fitted = convfactor.factorize(layer, name, calibration=calibration, **kwargs)
    x = _correlated(4, 12, 5, 7)
    with torch.no_grad():
        assert rel_err(fitted(x), layer(x)) <= rel_err(weight_only(x), layer(x)) + 1e-12
    if name in ("tucker2", "cp"):     # without the held-out check the last-piece refit over-fits here
        unchecked = convfactor.factorize(layer, name, calibration=calibration, holdout=0, **kwargs)
        with torch.no_grad():
            assert rel_err(unchecked(x), layer(x)) > rel_err(weight_only(x), layer(x))


def test_split_holdout():
    spec = ConvSpec.from_module(nn.Conv2d(3, 4, 3, padding=1))
    xs = [torch.zeros(3, 3, 8, 8), torch.ones(2, 3, 8, 8)]
    train, held = da.split_holdout(xs, spec, 0.2)
    assert [t.shape[0] for t in train] == [3, 1] and [h.shape[0] for h in held] == [1]
    assert bool((held[0] == 1).all())
    train, held = da.split_holdout(xs, spec, 0.0)
    assert held == [] and train == xs
    # one sample: a crop along its longest spatial axis
    train, held = da.split_holdout([torch.zeros(1, 3, 6, 20)], spec, 0.2)
    assert train[0].shape == (1, 3, 6, 16) and held[0].shape == (1, 3, 6, 4)
    reflect = ConvSpec.from_module(nn.Conv2d(3, 4, 5, padding=2, padding_mode="reflect"))
    train, held = da.split_holdout([torch.zeros(1, 3, 6, 10)], reflect, 0.2)    # wider than the padding
    assert train[0].shape == (1, 3, 6, 7) and held[0].shape == (1, 3, 6, 3)
    # too small to crop and still cover an unpadded 3x3 kernel: no check
    unpadded = ConvSpec.from_module(nn.Conv2d(3, 4, 3))
    train, held = da.split_holdout([torch.zeros(1, 3, 4, 4)], unpadded, 0.2)
    assert held == [] and train[0].shape == (1, 3, 4, 4)
    # Linear rows
    lin = ConvSpec.from_module(nn.Linear(5, 2))
    train, held = da.split_holdout([torch.zeros(10, 5)], lin, 0.3)
    assert train[0].shape == (7, 5) and held[0].shape == (3, 5)
    with pytest.raises(ValueError, match="holdout"):
        da.DataAwareSettings(holdout=1.0)


def test_the_compress_report_carries_the_fallback_note():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1, dtype=torch.float64))
    calibration = [_low_rank_inputs(4, 12, 6, 2, 1), _general_inputs(1, 12, 6, 2)]
    with pytest.warns(da.DataAwareFallbackWarning):
        _, report = convfactor.compress(model, [{"op_types": ["Conv2d"], "method": "channel_svd", "rank": 3,
                                                 "data_aware": True}], calibration[0][:1], calibration=calibration)
    assert "held-out" in report.layers[0].note and "note: " in report.table()

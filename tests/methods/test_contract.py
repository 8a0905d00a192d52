"""The Method contract, checked on every registered method (and a few non-default configurations)."""
import dataclasses
import json

import pytest
import torch
from torch import nn

from convfactor.methods import registry
from convfactor.methods.base import AUXILIARY_FACTORS, Method
from convfactor.spec.convspec import ConvSpec, UnsupportedLayer
from strategies import check_bad_options

NAMES = registry.available()
CONFIGURED = [registry.get(n) for n in NAMES] + [
    registry.get("cp", form="folded", n_iter=5), registry.get("basis", splits=2, impl="grouped"),
    registry.get("tt", d=3), registry.get("tucker2", hooi_iters=0), registry.get("lowrank_sparse", sparse_fraction=0.5)]


def _layer(method: Method) -> nn.Module:
    """A float64 layer the method accepts: a 3x3 conv, else a 1x1 conv, else a Linear."""
    torch.manual_seed(0)
    for layer in (nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(8, 12, 1), nn.Linear(24, 30)):
        try:
            method.check(ConvSpec.from_module(layer))
        except UnsupportedLayer:
            continue
        return layer.double()
    raise AssertionError(f"{method.name}: no test layer applies")


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name", NAMES)
def test_registered_method_is_a_frozen_dataclass_method(name):
    m = registry.get(name)
    assert isinstance(m, Method) and m.name == name
    assert dataclasses.is_dataclass(m) and type(m).__dataclass_params__.frozen
    assert not type(m).__abstractmethods__                       # every abstract hook is implemented
    assert registry.get(name) is m and registry.get(m) is m
    assert registry.get(name, **_defaults(type(m))) == m
    assert m.option_names() == tuple(_defaults(type(m)))
    for field in m.option_names():
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(m, field, None)
    with pytest.raises(ValueError, match=f"{name}: unknown option"):
        registry.get(name, no_such_option=1)
    # an energy target is defined exactly when the method has a spectrum
    assert m.supports_energy == (type(m).spectra is not Method.spectra)


@pytest.mark.parametrize("m", CONFIGURED, ids=lambda m: repr(m)[:60])
def test_factor_names_match_factorize_and_factors_of(m):
    assert isinstance(m.factor_names, tuple) and m.factor_names and all(isinstance(n, str) for n in m.factor_names)
    layer = _layer(m)
    spec = ConvSpec.from_module(layer)
    ranks = m.scaled_ranks(spec, 0.5)
    factors = m.factorize(layer.weight.detach(), spec, ranks)
    names = [n for n in factors if n not in AUXILIARY_FACTORS]
    assert all(m.declares(n) for n in names), (names, m.factor_names)
    assert all(any(_in_family(n, d) for n in names) for d in m.factor_names)      # and each one is returned
    module = m.build(spec, ranks, factors, dtype=torch.float64)
    read_back = m.factors_of(module)
    assert all(m.declares(n) for n in read_back)
    dense = m.reconstruct(factors, spec)
    assert torch.allclose(m.reconstruct(read_back, spec), dense, atol=1e-10 * float(dense.norm()))


def _in_family(name: str, declared: str) -> bool:
    return name == declared or (declared.endswith("*") and name.startswith(declared[:-1])
                                and name[len(declared) - 1:].isdigit())


@pytest.mark.parametrize("m", CONFIGURED, ids=lambda m: repr(m)[:60])
def test_recipe_round_trips_and_rebuilds_the_same_module(m):
    recipe = m.recipe()
    assert json.loads(json.dumps(recipe)) == recipe
    assert registry.get(m.name, **recipe) == m
    layer = _layer(m)
    spec = ConvSpec.from_module(layer)
    ranks = m.scaled_ranks(spec, 0.5)
    built = m.build(spec, ranks, m.factorize(layer.weight.detach(), spec, ranks), dtype=torch.float64)
    assert built.method == m.name and built.options == m.for_layer(spec).recipe()
    again = registry.get(m.name, **built.options).build(spec, ranks, None, dtype=torch.float64)
    assert again.options == built.options
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}


def test_joint_fitting_is_declared_not_probed():
    assert not any(registry.get(n).joint for n in NAMES)
    assert registry.get("basis", share="block").joint
    layer = nn.Conv2d(4, 4, 3)
    with pytest.raises(ValueError, match="jointly"):
        registry.get("channel_svd").factorize_shared({"a": layer}, {"a": (2,)})


def test_configured_methods_validate_their_options_once():
    check_bad_options([("cp", {"form": "fused"}, "form"), ("tucker2", {"hooi_iters": -1}, "hooi_iters"),
                       ("basis", {"impl": "fft"}, "impl"), ("tt", {"d": 1}, "d must be")])
    tt = registry.get("tt", in_modes=[2, 3, 4], out_modes=[5, 3, 2])
    assert tt.in_modes == (2, 3, 4) and hash(tt) == hash(registry.get("tt", in_modes=(2, 3, 4), out_modes=(5, 3, 2)))
    with pytest.raises(KeyError, match="unknown method"):
        registry.get("nope")

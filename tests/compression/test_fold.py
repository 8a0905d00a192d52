"""Folding factorized layers back to dense (between stages of multi-stage compression): exact for every
method, on conv options and Linear; a fold that does not reproduce the layer is refused, not returned."""
import pytest
import torch
from torch import nn

import convfactor
from convfactor.compression.fold import dense_of, fold_factorized
from convfactor.methods import registry
from convfactor.methods.base import Factorized
from convfactor.spec.convspec import ConvSpec, UnsupportedLayer

CONV = nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1, bias=True)


def _applicable(name: str, layer: nn.Module) -> bool:
    try:
        registry.get(name).check(ConvSpec.from_module(layer))
    except UnsupportedLayer:
        return False
    return True


@pytest.mark.parametrize("name", registry.available())
@pytest.mark.parametrize("layer", [nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=True),
                                   nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=True),
                                   nn.Linear(24, 30)], ids=["conv", "grouped-dilated", "linear"])
def test_fold_reproduces_every_method(name, layer):
    torch.manual_seed(0)
    layer = layer.double()
    if not _applicable(name, layer):
        pytest.skip(f"{name} does not take this layer")
    spec = ConvSpec.from_module(layer)
    m = registry.get(name)
    factorized = convfactor.factorize(layer, m, rank=tuple(max(1, r // 2) for r in m.full_rank(spec))
                                      if m.n_ranks > 1 else max(1, m.full_rank(spec)[0] // 2))
    dense = dense_of(factorized)
    assert type(dense) is type(layer)
    x = torch.randn(2, *( (24,) if isinstance(layer, nn.Linear) else (8, 11, 13)), dtype=torch.float64)
    assert torch.allclose(dense(x), factorized(x), atol=1e-9)


def test_fold_factorized_replaces_layers_in_a_copy():
    model = convfactor.models.get("resnet20").double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    compressed, _ = convfactor.compress(model, [{"op_types": ["Conv2d"], "method": "channel_svd", "macs_ratio": 0.5}], x)
    folded, skipped = fold_factorized(compressed)
    assert skipped == {}
    assert not any(isinstance(m, Factorized) for m in folded.modules())
    assert any(isinstance(m, Factorized) for m in compressed.modules())          # the input is left as it was
    with torch.no_grad():
        assert torch.allclose(folded(x), compressed(x), atol=1e-9)


def test_a_fold_that_does_not_match_is_refused_and_the_layer_kept():
    layer = convfactor.factorize(nn.Conv2d(8, 8, 3, padding=1).double(), "channel_svd", rank=4)
    with torch.no_grad():
        layer[0].weight.add_(0)          # unchanged factors ...
    layer[0].bias = nn.Parameter(torch.ones(4, dtype=torch.float64))   # ... but a bias the fold cannot carry exactly
    with pytest.raises(ValueError, match="does not reproduce"):
        dense_of(layer)
    model = nn.Sequential(layer)
    folded, skipped = fold_factorized(model)
    assert list(skipped) == ["0"] and isinstance(folded[0], Factorized)

"""Criterion objects: chosen by name from a table or handed in, and what they rely on from methods."""
import pytest
import torch
from torch import nn

from convfactor.compression.api import relative_error
from convfactor.measure.count import count
from convfactor.methods import registry
from convfactor.rank import Criterion, RankConfig, plan
from convfactor.rank.energy import error_estimate, spectral_error_is_exact
from convfactor.rank.planner import CRITERIA
from convfactor.spec.convspec import ConvSpec, UnsupportedLayer


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)), \
        torch.randn(1, 8, 12, 12)


class HalfRank(Criterion):
    """A user's criterion: half the full rank of the first method, on every other layer."""

    name = "half"

    def __call__(self, layers, context):
        chosen = {}
        for facts in layers[::2]:
            m = facts.methods[0]
            chosen[facts.name] = facts.layer_plan(m, tuple(max(1, r // 2) for r in m.full_rank(facts.spec)), self.name)
        context.plan.summary.update(message="halved")
        return chosen


def test_a_criterion_instance_is_used_as_given():
    model, x = _model()
    p = plan(model, x, criterion=HalfRank())
    assert p.criterion == "half" and p.summary.message == "halved"
    assert [(L.name, L.method, L.ranks) for L in p.layers] == [("0", "channel_svd", [8]), ("2", None, None)]
    # whole-model figures are the planner's, the same for every criterion: check them against a count
    compressed, _ = p.apply(model, x)
    assert p.summary.macs_after == count(compressed, x)["macs"] and p.summary.macs_before == count(model, x)["macs"]


def test_every_named_criterion_is_a_criterion_object():
    assert set(CRITERIA) == {"rank", "uniform", "energy", "vbmf", "budget", "latency"}
    for name, cls in CRITERIA.items():
        assert issubclass(cls, Criterion) and cls.name == name


def test_a_criterion_checks_its_target():
    model, x = _model()
    with pytest.raises(ValueError, match="needs a target of rank="):
        plan(model, x, target="macs=50%", criterion="rank")
    with pytest.raises(ValueError, match="needs a target of speedup=... or error="):
        plan(model, x, criterion="latency")
    with pytest.raises(ValueError, match="round_to"):
        plan(model, x, config=RankConfig(round_to=0))


@pytest.mark.parametrize("name", registry.available())
def test_spectral_error_is_exact_where_the_planner_trusts_it(name):
    """The planner reads errors off the spectra (no fitting) for these methods: it must be the fitted error."""
    method = registry.get(name)
    if not spectral_error_is_exact(method):
        pytest.skip(f"{name}: the planner fits its errors")
    torch.manual_seed(1)
    conv = nn.Conv2d(12, 16, 3, padding=1)
    spec = ConvSpec.from_module(conv)
    try:
        method.check(spec)
    except UnsupportedLayer:
        pytest.skip(f"{name} does not take a 3x3 conv")
    w = conv.weight.detach().double()
    for t in (0.25, 0.6):
        ranks = tuple(method.scaled_ranks(spec, t))
        fitted = relative_error(method.reconstruct(method.factorize(w, spec, ranks), spec), w)
        assert error_estimate(method.spectra(w, spec), ranks) == pytest.approx(fitted, rel=1e-6, abs=1e-9)

"""``Method.factorization_cost``: every registered method estimates the flops of its own fit
(what ``compress``'s "this may take a while" warning adds up), positive, finite and growing with
the layer."""
import dataclasses
import math

import pytest
from torch import nn

from convfactor.methods import registry
from convfactor.methods.base import Method
from convfactor.methods.channel_svd import ChannelSVD
from convfactor.methods.linalg import gram_flops, svd_flops, truncated_svd_flops
from convfactor.spec.convspec import ConvSpec, UnsupportedLayer

CONFIGURED = [registry.get(n) for n in registry.available()] + [
    registry.get("cp", form="folded", n_iter=5), registry.get("basis", splits=2), registry.get("tt", d=3),
    registry.get("tucker2", hooi_iters=0), registry.get("lowrank_sparse", sparse_fraction=0.5),
    registry.get("channel_svd", svd="randomized"), registry.get("sliced_svd", svd="gram")]

#: (small, large) layers of one kind; the first pair a method accepts is used
PAIRS = [(lambda: nn.Conv2d(8, 12, 3, padding=1), lambda: nn.Conv2d(32, 48, 3, padding=1)),
         (lambda: nn.Conv2d(8, 12, 1), lambda: nn.Conv2d(32, 48, 1)),
         (lambda: nn.Linear(24, 30), lambda: nn.Linear(96, 120))]


def _specs(method: Method, pairs=PAIRS) -> tuple[ConvSpec, ConvSpec]:
    for small, large in pairs:
        specs = ConvSpec.from_module(small()), ConvSpec.from_module(large())
        try:
            for spec in specs:
                method.check(spec)
        except UnsupportedLayer:
            continue
        return specs
    raise AssertionError(f"{method.name}: no test layer applies")


@pytest.mark.parametrize("m", CONFIGURED, ids=lambda m: m.key())
def test_cost_is_positive_finite_and_grows_with_the_layer(m):
    small, large = _specs(m)
    costs = [m.factorization_cost(spec, m.scaled_ranks(spec, 0.5)) for spec in (small, large)]
    assert all(isinstance(c, float) and math.isfinite(c) and c > 0 for c in costs), costs
    assert costs[1] > costs[0], costs
    # and at the full rank
    full = [m.factorization_cost(spec, m.full_rank(spec)) for spec in (small, large)]
    assert all(math.isfinite(c) and c > 0 for c in full) and full[1] > full[0], full


@pytest.mark.parametrize("name", [n for n in registry.available() if registry.get(n).supports_transposed])
def test_transposed_layers_are_costed_on_their_own_layout(name):
    m = registry.get(name)
    small, large = _specs(m, [(lambda: nn.ConvTranspose2d(8, 12, 3, stride=2), lambda: nn.ConvTranspose2d(32, 48, 3)),
                              (lambda: nn.ConvTranspose2d(8, 12, 1), lambda: nn.ConvTranspose2d(32, 48, 1))])
    costs = [m.factorization_cost(spec, m.scaled_ranks(spec, 0.5)) for spec in (small, large)]
    assert 0 < costs[0] < costs[1] and math.isfinite(costs[1])


def test_every_builtin_method_whose_fit_is_not_one_svd_says_so():
    for name in ("tucker2", "cp", "lowrank_sparse", "tt", "depthwise", "spatial_svd", "basis", "sliced_svd"):
        assert type(registry.get(name)).factorization_cost is not Method.factorization_cost, name


def test_the_default_is_one_thin_svd_per_group():
    @dataclasses.dataclass(frozen=True)
    class OneSVD(ChannelSVD):
        name = "one_svd_for_this_test"
        factorization_cost = Method.factorization_cost
    spec = ConvSpec.from_module(nn.Conv2d(16, 24, 3, groups=4))
    assert OneSVD().factorization_cost(spec, (2,)) == 4 * svd_flops(6, 4 * 9)


def test_costs_follow_the_options_and_routes():
    conv = ConvSpec.from_module(nn.Conv2d(64, 64, 3))
    cp, tucker, sparse = registry.get("cp"), registry.get("tucker2"), registry.get("lowrank_sparse")
    assert registry.get("cp", n_iter=5).factorization_cost(conv, (32,)) < cp.factorization_cost(conv, (32,))
    assert registry.get("tucker2", hooi_iters=0).factorization_cost(conv, (8, 8)) * 3 == \
        tucker.factorization_cost(conv, (8, 8)) == 3 * (2 * gram_flops(64, 64 * 9))
    assert sparse.factorization_cost(conv, (8, 0)) == gram_flops(64, 64 * 9)          # no ADMM without channels
    assert sparse.factorization_cost(conv, (8, 8)) == (sparse.admm_iters + sparse.refit_iters) * svd_flops(64, 576)
    # channel SVD: the route truncated_svd takes (LAPACK, Gram, randomized range finder)
    big = ConvSpec.from_module(nn.Linear(4096, 4096))
    for svd in ("exact", "gram", "randomized"):
        assert registry.get("linear_svd", svd=svd).factorization_cost(big, (10,)) == truncated_svd_flops(
            4096, 4096, 10, svd)
    assert registry.get("linear_svd", svd="randomized").factorization_cost(big, (10,)) < \
        registry.get("linear_svd", svd="gram").factorization_cost(big, (10,)) < \
        registry.get("linear_svd").factorization_cost(big, (10,))
    # full rank of a large matrix takes the Gram route whatever svd= says
    assert registry.get("linear_svd").factorization_cost(big, (4096,)) == gram_flops(4096, 4096)


def test_tt_counts_each_step_of_its_sweep():
    tt = registry.get("tt", in_modes=[4, 4], out_modes=[2, 8])
    spec = ConvSpec.from_module(nn.Linear(16, 16))
    assert tt.factorization_cost(spec, (3,)) == svd_flops(2 * 4, 8 * 4)              # d - 1 = 1 SVD
    tt3 = registry.get("tt", in_modes=[2, 2, 4], out_modes=[2, 2, 4])
    assert tt3.factorization_cost(spec, (2, 3)) == svd_flops(4, 64) + svd_flops(2 * 4, 16)

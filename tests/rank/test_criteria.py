import math

import pytest
import torch
from torch import nn

from convfactor.spec.convspec import ConvSpec
from convfactor.methods import registry
from convfactor.methods.base import Cost
from convfactor.methods.spatial_svd import SpatialSVD
from convfactor.rank.criteria import (below_dense, clip_to_speed_bound, layer_kappa, mark_by_condition,
                                      round_ranks, speed_bound)


class SpatialCost(SpatialSVD):
    """Only the cost of Tai et al.'s kx1 + 1xk pair: K(dC + dN) MACs per output pixel (stride 1); the
    factorization hooks the Method contract requires come from SpatialSVD and are not used here."""

    name = "spatial_cost_only"
    factor_names = ()

    def factorize(self, weight, spec, ranks, **options):
        raise NotImplementedError("a cost model only")

    reconstruct = build = factorize

    def full_rank(self, spec):
        return (min(spec.in_channels * spec.kernel_size[0], spec.out_channels * spec.kernel_size[1]),)

    def cost(self, spec, ranks, input_size=()):
        (K,) = ranks
        pixels = math.prod(spec.output_size(input_size))
        d = spec.kernel_size[0]
        return Cost(params=K * d * (spec.in_channels + spec.out_channels),
                    macs=pixels * K * d * (spec.in_channels + spec.out_channels))


@pytest.mark.parametrize("C,N,d", [(64, 64, 3), (16, 64, 3), (128, 32, 5), (3, 16, 3)])
def test_speed_bound_spatial_svd_formula(C, N, d):
    spec = ConvSpec.from_module(nn.Conv2d(C, N, d, padding=d // 2))
    bound = d * N * C / (N + C)                  # K must be < d N C / (N + C)
    m = SpatialCost()
    largest_ok = math.ceil(bound) - 1
    assert speed_bound(m, spec, (16, 16)) == (largest_ok,)
    assert below_dense(m, spec, (largest_ok,), (16, 16))
    assert not below_dense(m, spec, (largest_ok + 1,), (16, 16))
    # a rank at or above the bound is clipped to it
    assert clip_to_speed_bound(m, spec, (m.full_rank(spec)[0],), (16, 16)) == (largest_ok,)


def test_speed_bound_on_registered_spatial_svd_if_present():
    if "spatial_svd" not in registry._METHODS:
        pytest.skip("spatial_svd not registered")
    try:
        m = registry.get("spatial_svd")
    except Exception:
        pytest.skip("spatial_svd not available in this version")
    C, N, d = 64, 48, 3
    spec = ConvSpec.from_module(nn.Conv2d(C, N, d, padding=1))
    bound = speed_bound(m, spec, (16, 16))
    assert bound is not None and bound[0] < d * N * C / (N + C)


@pytest.mark.parametrize("C,N,k", [(64, 64, 3), (16, 64, 3), (3, 16, 3), (64, 10, 1)])
def test_speed_bound_channel_svd(C, N, k):
    # channel SVD costs r (C k^2 + N) per pixel against N C k^2: r < N C k^2 / (N + C k^2)
    spec = ConvSpec.from_module(nn.Conv2d(C, N, k))
    m = registry.get("channel_svd")
    limit = N * C * k * k / (N + C * k * k)
    b = speed_bound(m, spec, (12, 12))
    if limit <= 1:
        assert b is None
        assert clip_to_speed_bound(m, spec, (1,), (12, 12)) is None
    else:
        assert b == (math.ceil(limit) - 1,)
    for r in range(1, m.full_rank(spec)[0] + 1):
        assert below_dense(m, spec, (r,), (12, 12)) == (r < limit)


def test_round_ranks():
    assert round_ranks((5, 12, 13, 60), 8, (64, 64, 64, 64)) == (8, 16, 16, 64)
    assert round_ranks((3,), 8, (64,)) == (8,)            # never 0
    assert round_ranks((3,), 8, (5,)) == (5,)             # never above the max rank
    assert round_ranks((30,), 16, (64,), mode="down") == (16,)
    assert round_ranks((17,), 16, (64,), mode="up") == (32,)
    assert round_ranks((1,), 16, (64,), mode="down") == (16,)
    assert round_ranks((0, 70), None, (64, 64)) == (1, 64)
    with pytest.raises(ValueError):
        round_ranks((4,), 8, (64,), mode="sideways")


def test_condition_number_marking():
    conv = nn.Conv2d(4, 8, 3)
    w = torch.randn(8, 36, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    s = torch.logspace(0, -3, 8, dtype=torch.float64)       # kappa = 1000
    with torch.no_grad():
        conv.weight.copy_(((u * s) @ vh).reshape(8, 4, 3, 3))
    kappa = layer_kappa(conv.weight, ConvSpec.from_module(conv))
    assert kappa == pytest.approx(1000, rel=1e-4)
    marks = mark_by_condition({"a": kappa, "b": 10.0, "c": float("inf")}, threshold=100)
    assert marks == {"a": True, "b": False, "c": True}
    with pytest.raises(ValueError):
        mark_by_condition({"a": 1.0}, 0)

import math

import pytest
import torch

from convfactor.spec.convspec import ConvSpec
from convfactor.methods import registry
from convfactor.rank.vbmf import evbmf, evbmf_spectrum, kernel_vbmf_ranks, weaken


def planted(L, M, r, noise, seed):
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(L, r, generator=g, dtype=torch.float64) @ torch.randn(r, M, generator=g, dtype=torch.float64)
    return signal + noise * torch.randn(L, M, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("L,M,r,noise", [(64, 576, 10, 0.5), (50, 50, 5, 0.3), (64, 64, 20, 0.5),
                                         (3, 576, 2, 0.5), (128, 300, 33, 1.0), (16, 144, 1, 0.2)])
def test_planted_rank_is_recovered_in_both_orientations(L, M, r, noise):
    Y = planted(L, M, r, noise, seed=L + M + r)
    rank, sigma2 = evbmf(Y)
    assert rank == r
    assert evbmf(Y.T)[0] == r
    # The estimated noise variance is close to the planted one.
    assert sigma2 == pytest.approx(noise ** 2, rel=0.35)


@pytest.mark.parametrize("L,M", [(64, 576), (40, 40), (8, 72), (256, 64)])
def test_pure_noise_gives_zero_raw_but_never_zero_floored(L, M):
    Y = torch.randn(L, M, generator=torch.Generator().manual_seed(L * M), dtype=torch.float64)
    rank, sigma2 = evbmf(Y)
    assert rank == 0                                   # the raw EVB estimate
    assert sigma2 == pytest.approx(1.0, rel=0.15)
    # A conv kernel that is pure noise: the planner-facing ranks are floored at 1.
    conv = torch.nn.Conv2d(M // 9 if M % 9 == 0 else M, L, 3 if M % 9 == 0 else 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(1)))
    spec = ConvSpec.from_module(conv)
    method = registry.get("channel_svd")
    assert kernel_vbmf_ranks(method, spec, conv.weight.double()) == (1,)


def test_kernel_vbmf_on_planted_low_rank_kernel():
    # (N, C, 3, 3) whose (N, 9C) unfolding has rank 6 plus noise
    N, C, r = 48, 16, 6
    W = planted(N, C * 9, r, 0.05, seed=3).reshape(N, C, 3, 3)
    spec = ConvSpec.from_module(torch.nn.Conv2d(C, N, 3))
    m = registry.get("channel_svd")
    assert kernel_vbmf_ranks(m, spec, W) == (r,)
    full = m.full_rank(spec)[0]
    assert kernel_vbmf_ranks(m, spec, W, weakening=0.0) == (full,)
    assert kernel_vbmf_ranks(m, spec, W, weakening=0.5) == (math.ceil(full - 0.5 * (full - r)),)


def test_weaken_formula_and_floor():
    assert weaken(10, 64, 1.0) == 10
    assert weaken(10, 64, 0.0) == 64
    assert weaken(10, 64, 0.5) == 37
    assert weaken(0, 64, 1.0) == 1                    # floor: never 0
    with pytest.raises(ValueError):
        weaken(3, 10, 1.5)


def test_spectrum_entry_point_matches_matrix_entry_point():
    Y = planted(30, 90, 4, 0.3, seed=9)
    s = torch.linalg.svdvals(Y)
    assert evbmf_spectrum(s, (30, 90)) == pytest.approx(evbmf(Y))
    # a known noise variance is used as given
    assert evbmf(Y, sigma2=0.09) == (4, 0.09)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        evbmf(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="NaN"):
        evbmf(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    assert evbmf(torch.zeros(5, 7))[0] == 0
    import convfactor
    assert convfactor.evbmf is evbmf


def test_tucker2_mode_ranks_as_in_kim_et_al():
    """Kim et al. 2016: EVBMF on the mode-C and mode-N unfoldings recovers a planted Tucker-2 core."""
    try:
        m = registry.get("tucker2")
    except Exception:
        pytest.skip("tucker2 not available in this version")
    N, C, r_in, r_out = 48, 40, 7, 5
    g = torch.Generator().manual_seed(4)
    core = torch.randn(r_out, r_in, 3, 3, generator=g, dtype=torch.float64)
    U = torch.randn(N, r_out, generator=g, dtype=torch.float64)
    V = torch.randn(C, r_in, generator=g, dtype=torch.float64)
    W = torch.einsum("na,cb,abhw->nchw", U, V, core) + 0.01 * torch.randn(N, C, 3, 3, generator=g, dtype=torch.float64)
    spec = ConvSpec.from_module(torch.nn.Conv2d(C, N, 3))
    ranks = dict(zip(m.rank_names, kernel_vbmf_ranks(m, spec, W)))
    assert ranks == {"r1": r_in, "r2": r_out}

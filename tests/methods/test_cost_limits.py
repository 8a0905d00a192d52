"""Cost limits (issue 14, "What to build" 6): randomized and float32 SVD routes, the fast low-rank +
sparse ADMM, and per-iteration progress.  Fast: no whole-model timing here."""
import math

import pytest
import torch
from torch import nn

import convfactor
from convfactor.methods import linalg
from convfactor.methods import lowrank_sparse as ls
from convfactor.methods import registry
from convfactor.methods.cp import cp_als
from strategies import check_bad_options, rel_err


def _known_spectrum(m, n, values, seed=0):
    """``U diag(values) V^T`` with random orthonormal ``U: (m, k)``, ``V: (n, k)``."""
    g = torch.Generator().manual_seed(seed)
    k = len(values)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (u * values) @ v.T


def _optimal_error(values, rank):
    return float(values[rank:].pow(2).sum().sqrt() / values.pow(2).sum().sqrt())


@pytest.fixture(scope="module")
def big():
    """A 512 x 4608 matrix (a 512x512x3x3 kernel's unfolding) with a decaying, known spectrum."""
    values = torch.logspace(0, -3, 512, dtype=torch.float64)
    return _known_spectrum(512, 4608, values), values


@pytest.mark.parametrize("rank", [32, 128])
def test_randomized_route_is_near_the_optimal_truncation(big, rank):
    matrix, values = big
    left, right = linalg.truncated_svd(matrix, rank, svd="randomized")
    assert left.shape == (512, rank) and right.shape == (rank, 4608) and left.dtype == torch.float64
    err = rel_err(left @ right, matrix)
    optimal = _optimal_error(values, rank)
    assert optimal <= err * (1 + 1e-12) and err <= 1.05 * optimal
    # balanced factors: both sides carry sqrt(S)
    assert torch.allclose(left.norm(dim=0), right.norm(dim=1), rtol=1e-6)


def test_gram_and_float32_routes(big):
    matrix, values = big
    rank = 100
    optimal = _optimal_error(values, rank)
    left, right = linalg.truncated_svd(matrix, rank, svd="gram")
    assert rel_err(left @ right, matrix) == pytest.approx(optimal, rel=1e-8)
    left, right = linalg.truncated_svd(matrix, rank, precision="float32")
    assert left.dtype == torch.float64                      # factors come back in the input's dtype
    assert rel_err(left @ right, matrix) == pytest.approx(optimal, rel=1e-4)   # float32-accurate
    f32 = matrix.float()
    left, right = linalg.truncated_svd(f32, rank, svd="randomized")
    assert left.dtype == torch.float32 and rel_err(left.double() @ right.double(), matrix) <= 1.05 * optimal


@pytest.mark.parametrize("svd", linalg.SVD_MODES)
@pytest.mark.parametrize("precision", linalg.PRECISIONS)
def test_full_rank_is_exact_on_every_route(svd, precision):
    """Above ``LARGE_SVD`` work a full-rank request takes the Gram route: still exact."""
    g = torch.Generator().manual_seed(1)
    for shape in [(2, 300, 700), (700, 300)]:       # batched wide, and tall
        matrix = torch.randn(*shape, generator=g, dtype=torch.float64)
        full = min(shape[-2:])
        left, right = linalg.truncated_svd(matrix, full, svd=svd, precision=precision)
        assert rel_err(left @ right, matrix) <= (1e-12 if precision == "float64" else 1e-5)


def test_channel_svd_of_a_big_linear_at_full_rank_is_exact():
    """The VGG-11 case in small (a Linear whose LAPACK SVD is the slow part): full rank goes through
    the Gram route and reproduces the layer."""
    torch.manual_seed(0)
    layer = nn.Linear(1200, 300, dtype=torch.float64)
    new = convfactor.factorize(layer, "linear_svd", rank=300)
    x = torch.randn(4, 1200, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(new(x), layer(x)) <= 1e-12


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="svd must be one of"):
        linalg.truncated_svd(torch.eye(3, dtype=torch.float64), 2, svd="fast")
    with pytest.raises(ValueError, match="precision must be one of"):
        linalg.check_svd_options("x", "exact", "float16")
    check_bad_options([("lowrank_sparse", {"precision": "half"}, "precision"),
                       ("lowrank_sparse", {"admm_tol": -1}, "admm_tol"), ("cp", {"precision": "bf16"}, "precision")])


def test_gram_svt_equals_the_lapack_svt():
    g = torch.Generator().manual_seed(2)
    for shape in [(20, 50), (50, 20)]:
        m = torch.randn(*shape, generator=g, dtype=torch.float64)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        for tau in (0.0, 1.0, 3.0):
            expected = (u * (s - tau).clamp(min=0)) @ vh
            assert torch.allclose(linalg.shrink_singular_values(m, tau), expected, atol=1e-10)


def test_admm_element_wise_weight_only_step_matches_the_dense_solve():
    """``G = c I`` through the dense (P, Q)-step solves the same problem as ``G = I`` (element-wise)
    with both penalties divided by ``c``: two code paths, one optimum."""
    g = torch.Generator().manual_seed(3)
    n, c, k = 16, 10, 9
    w = torch.randn(n, c * k, generator=g, dtype=torch.float64)
    lam = 0.1 * float(torch.linalg.matrix_norm(w, ord=2))
    a1, b1 = ls.admm_lowrank_sparse(w, None, c, lam, lam, iters=400, tol=1e-10)
    gram = 2.0 * torch.eye(c * k, dtype=torch.float64)
    a2, b2 = ls.admm_lowrank_sparse(w, gram, c, 2 * lam, 2 * lam, iters=400, tol=1e-10)
    assert rel_err(a2, a1) < 1e-5 and rel_err(b2, b1) < 1e-5


def test_admm_early_stop_keeps_the_result_and_float32_agrees():
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 24, 3, padding=1, dtype=torch.float64)
    ranks = (6, 4)
    full = convfactor.factorize(layer, "lowrank_sparse", rank=ranks, admm_tol=0, admm_iters=300)
    early = convfactor.factorize(layer, "lowrank_sparse", rank=ranks)                # admm_tol=1e-4
    low = convfactor.factorize(layer, "lowrank_sparse", rank=ranks, precision="float32")
    assert torch.equal(early[0].index, full[0].index) and torch.equal(low[0].index, full[0].index)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = rel_err(full(x), layer(x))
        assert rel_err(early(x), layer(x)) == pytest.approx(ref, rel=1e-3)
        assert rel_err(low(x), layer(x)) == pytest.approx(ref, rel=1e-3)


def test_progress_callbacks_are_called_every_iteration():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(1, 6, 5, 3, 3, generator=g, dtype=torch.float64)
    calls = []
    res = cp_als(t, 4, n_iter=7, tol=0, callback=lambda i, n, e: calls.append((i, n, e)))
    assert [c[0] for c in calls] == list(range(1, 8)) and all(c[1] == 7 for c in calls)
    assert [c[2] for c in calls] == res.errors
    w = torch.randn(12, 5 * 9, generator=g, dtype=torch.float64)
    seen = []
    ls.admm_lowrank_sparse(w, None, 5, 0.5, 0.5, iters=12, callback=lambda i, n, e: seen.append((i, e)))
    assert [i for i, _ in seen] == list(range(1, 13))
    assert all((e is None) == (i % 5 != 0 and i != 12) for i, e in seen)   # residuals at the checks
    assert all(math.isfinite(e) for _, e in seen if e is not None)


@pytest.mark.parametrize("svd,precision,tol", [("gram", "float64", 1e-9), ("randomized", "float64", 1e-9),
                                               ("exact", "float32", 1e-5), ("randomized", "float32", 1e-5)])
def test_channel_svd_options_are_exact_at_full_rank_and_near_optimal_below(svd, precision, tol):
    import convfactor
    from convfactor.methods import registry
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 96, 3, padding=1).double()
    x = torch.randn(2, 64, 8, 8, dtype=torch.float64)
    method = registry.get("channel_svd", svd=svd, precision=precision)
    with torch.no_grad():
        full = convfactor.factorize(conv, method, rank=96)
        assert float((full(x) - conv(x)).norm() / conv(x).norm()) < tol
        exact = convfactor.factorize(conv, "channel_svd", rank=24)
        approx = convfactor.factorize(conv, method, rank=24)
        e_exact = float((exact(x) - conv(x)).norm())
        assert float((approx(x) - conv(x)).norm()) <= 1.05 * e_exact + 1e-9

"""A rough estimate of how long a factorization takes, to warn before a long wait.

The work is dominated by dense float64 linear algebra on the layer's kernel matrix
``(N/g) x (C/g * prod(kernel))`` per group: a thin SVD of an ``m x n`` matrix (``m >= n``) costs
about ``4 m n^2 + 8 n^3`` flops (Golub & Van Loan, *Matrix Computations*, 4th ed., sec. 8.6.3, the
R-SVD), a basis from the Gram matrix and its eigendecomposition about ``m n^2 + 9 n^3``.  Iterative
methods repeat their main step: Tucker-2 a Gram basis per unfolding per HOOI sweep (counted as at
most three sweeps: HOOI stops early), CP an ALS sweep (``~6 * numel * rank`` per mode) per
iteration, ``lowrank_sparse`` one SVD per ADMM and refit iteration.  The flop rate is measured once
per process on a small float64 SVD.  Checked on one core (float64, layers of 64-1024 channels):
0.8-2x the real time for every method but spatial_svd (0.3x on a small layer, where overhead rules).  This is an order of magnitude, not a promise: it only says "this may take a while".
"""
from __future__ import annotations

import functools
import math
import time

import torch

from ..methods.base import Method
from ..spec.convspec import ConvSpec

__all__ = ["svd_flops", "gram_flops", "factorization_flops", "estimate_seconds", "flop_rate", "WARN_SECONDS"]

#: a compress whose estimated factorization time exceeds this many seconds prints a warning
WARN_SECONDS = 30.0
#: HOOI sweeps counted for Tucker-2 (it usually stops within them, see ``hooi_tol``)
_HOOI_SWEEPS = 3


def svd_flops(m: int, n: int) -> float:
    """Flops of a thin SVD (with singular vectors) of an ``m x n`` matrix."""
    big, small = max(m, n), min(m, n)
    return 4.0 * big * small ** 2 + 8.0 * small ** 3


def gram_flops(m: int, n: int) -> float:
    """Flops of a leading basis from the smaller Gram matrix of an ``m x n`` matrix and its eigh."""
    big, small = max(m, n), min(m, n)
    return float(big * small ** 2) + 9.0 * small ** 3


def factorization_flops(method: Method, spec: ConvSpec, ranks: tuple[int, ...]) -> float:
    """Estimated flops of factorizing a layer of ``spec`` with ``method`` at ``ranks``."""
    g, k = spec.groups, spec.kernel_volume
    n_out, n_in = spec.out_per_group, spec.in_per_group
    one_svd = g * svd_flops(n_out, n_in * k)
    if method.name == "tucker2":
        sweeps = 1 + min(int(getattr(method, "hooi_iters", 0) or 0), _HOOI_SWEEPS - 1)
        return sweeps * g * (gram_flops(n_out, n_in * k) + gram_flops(n_in, n_out * k))
    if method.name == "cp":
        rank = ranks[0] if ranks else 1
        return one_svd + int(getattr(method, "n_iter", 1)) * 6.0 * g * n_out * n_in * k * rank * max(1, spec.dim + 2)
    if method.name == "lowrank_sparse":
        iters = int(getattr(method, "admm_iters", 1)) + int(getattr(method, "refit_iters", 0))
        return iters * one_svd
    return one_svd


@functools.lru_cache(maxsize=1)
def flop_rate() -> float:
    """Float64 SVD flops per second on this machine (measured once, on a 256 x 256 matrix)."""
    a = torch.randn(256, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.linalg.svd(a, full_matrices=False)                 # warm-up (LAPACK initialization)
    start = time.perf_counter()
    torch.linalg.svd(a, full_matrices=False)
    elapsed = max(time.perf_counter() - start, 1e-6)
    return svd_flops(256, 256) / elapsed


def estimate_seconds(method: Method, spec: ConvSpec, ranks: tuple[int, ...]) -> float:
    """Estimated seconds to factorize one layer on this machine (CPU, float64)."""
    flops = factorization_flops(method, spec, ranks)
    return flops / flop_rate() if flops > 0 and math.isfinite(flops) else 0.0

"""A rough estimate of how long a factorization takes, to warn before a long wait.

The flops of fitting one layer are the method's own estimate,
:meth:`~convfactor.methods.base.Method.factorization_cost` (dense float64 linear algebra on the
layer's kernel: by default one thin SVD of each group's ``(N/g) x (C/g * prod(kernel))`` matrix,
Golub & Van Loan's R-SVD count; Tucker-2 a Gram basis per unfolding per HOOI sweep, CP an ALS sweep
per iteration, ``lowrank_sparse`` one SVD-sized step per ADMM and refit iteration, ...).  The flop
rate is measured once per process on a small float64 SVD.  Checked on one core (float64, Gaussian
3x3 convs of 128 and 512 channels at half the full rank; TT on 1024 x 1024 and 4096 -> 1024 Linears):
0.3-4x the real time, the low end on the small layers, where overhead rules; outside that range
depthwise (0.04x: thousands of tiny problems, under 0.1 s in all) and lowrank_sparse (9x: its ADMM
usually stops long before ``admm_iters``).  This is an order of magnitude, not a promise: it only
says "this may take a while".
"""
from __future__ import annotations

import functools
import math
import time

import torch

from ..methods.base import Method
from ..methods.linalg import svd_flops
from ..spec.convspec import ConvSpec

__all__ = ["factorization_flops", "estimate_seconds", "flop_rate", "WARN_SECONDS"]

#: a compress whose estimated factorization time exceeds this many seconds prints a warning
WARN_SECONDS = 30.0


def factorization_flops(method: Method, spec: ConvSpec, ranks: tuple[int, ...]) -> float:
    """Estimated flops of factorizing a layer of ``spec`` with ``method`` at ``ranks``."""
    return float(method.factorization_cost(spec, tuple(ranks)))


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

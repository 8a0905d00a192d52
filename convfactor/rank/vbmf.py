"""Empirical variational Bayesian matrix factorization (EVBMF) rank estimation.

Nakajima, Sugiyama, Babacan & Tomioka, "Global analytic solution of fully-observed variational
Bayesian matrix factorization", JMLR 14 (2013): for ``Y: (L, M)`` with ``L <= M`` and
``alpha = L / M``, the EVB estimator keeps exactly the singular values above

    gamma_EVB = sigma * sqrt(M * (1 + tau_bar) * (1 + alpha / tau_bar)),   tau_bar ~= 2.5129 sqrt(alpha)

(Theorem 13 / eq. 29 there), where the noise variance ``sigma^2`` is itself estimated by
minimizing the free energy (their eq. 30-31), a one-dimensional problem on a bounded interval
(Section 4.3).  Kim et al. 2016 ("Compression of deep convolutional neural networks for fast and
low power mobile applications") apply it to the mode-0 and mode-1 unfoldings of a conv kernel to
pick Tucker-2 ranks; :func:`kernel_vbmf_ranks` does that for any method's spectra.

Two practical additions:

* a **floor**: a rank is never 0 (pure noise makes the EVB estimate 0, which would delete a
  layer; jacobgil/pytorch-tensor-decompositions#8);
* **weakening** (musco, Gusak et al. 2019): ``r = R - w * (R - r_vbmf)``, with ``w = 1`` the
  plain EVBMF rank and ``w = 0`` the full rank ``R``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["evbmf", "evbmf_spectrum", "weaken", "kernel_vbmf_ranks", "TAU_BAR_COEF"]

#: tau_bar = TAU_BAR_COEF * sqrt(alpha) (Nakajima et al. 2013, the approximation below Theorem 13)
TAU_BAR_COEF = 2.5129


def _tau(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 28: tau(x; alpha) = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2."""
    d = x - (1 + alpha)
    return 0.5 * (d + torch.sqrt((d * d - 4 * alpha).clamp_min(0)))


def _free_energy(sigma2: torch.Tensor, s2: torch.Tensor, L: int, M: int, residual: float,
                 x_bar: float) -> torch.Tensor:
    """The sigma^2-dependent part of 2 x the EVB free energy (eq. 30), for singular values^2 ``s2``.

    ``sigma2: (G,)`` candidate noise variances -> ``(G,)`` objective values.
    """
    alpha = L / M
    x = s2.unsqueeze(0) / (M * sigma2.unsqueeze(1))                  # (G, H)
    big = x > x_bar
    t = _tau(torch.where(big, x, torch.full_like(x, x_bar + 1)), alpha)
    small_terms = torch.where(big, torch.zeros_like(x), x - torch.log(x))
    big_terms = torch.where(big, x - t + torch.log((t + 1) / x) + alpha * torch.log(t / alpha + 1),
                            torch.zeros_like(x))
    return (small_terms + big_terms).sum(1) + residual / (M * sigma2) + (L - s2.numel()) * torch.log(sigma2)


def _minimize_log(f, lo: float, hi: float, grid: int = 64, rounds: int = 4) -> float:
    """Minimize a vectorized ``f`` on ``[lo, hi]`` (lo > 0): log-spaced grids, each zooming on the best."""
    if hi <= lo:
        return lo
    a, b = math.log(lo), math.log(hi)
    best = None
    for _ in range(rounds):
        xs = torch.linspace(a, b, grid, dtype=torch.float64)
        values = f(xs.exp())
        k = int(torch.argmin(values))
        if best is None or float(values[k]) <= best[0]:
            best = (float(values[k]), float(xs[k]))
        step = (b - a) / (grid - 1)
        a, b = float(xs[k]) - step, float(xs[k]) + step
    return math.exp(best[1])


def evbmf_spectrum(singular_values: torch.Tensor, shape: Sequence[int], *, residual: float = 0.0,
                   sigma2: float | None = None) -> tuple[int, float]:
    """EVBMF rank from the singular values of a matrix of ``shape`` (either orientation).

    ``singular_values: (H,)`` descending, ``H <= min(shape)``; ``residual`` is the squared
    Frobenius norm of the part of the matrix beyond the ``H`` given values.  Returns
    ``(rank, sigma2)``, the raw EVB rank (may be 0) and the noise variance (estimated unless given).
    """
    L, M = sorted(int(v) for v in shape)
    s = singular_values.detach().double().flatten()
    H = s.numel()
    if H == 0 or H > L:
        raise ValueError(f"need 1..{L} singular values for a {shape[0]}x{shape[1]} matrix, got {H}")
    s2 = s.pow(2)
    total = float(s2.sum()) + residual
    if total <= 0:
        return 0, 0.0
    alpha = L / M
    tau_bar = TAU_BAR_COEF * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    if sigma2 is None:
        # Bounds of Section 4.3: sigma^2 is at most the mean square of Y, and at least what the
        # trailing values imply when at most ceil(L/(1+alpha)) - 1 components are signal.
        upper = total / (L * M)
        h_ub = max(0, min(math.ceil(L / (1 + alpha)) - 1, H) - 1)
        tail = s2[h_ub + 1:] if h_ub + 1 < H else s2[-1:]
        lower = max(float(s2[min(h_ub + 1, H - 1)]) / (M * x_bar), float(tail.mean()) / M)
        tiny = upper * 1e-12
        lower = min(max(lower, tiny), upper)
        positive = s2.clamp_min(total * 1e-300)

        def objective(v: torch.Tensor) -> torch.Tensor:
            return _free_energy(v, positive, L, M, residual, x_bar)

        sigma2 = _minimize_log(objective, lower, upper)
    threshold = math.sqrt(M * sigma2 * x_bar)
    return int((s > threshold).sum()), float(sigma2)


def evbmf(matrix: torch.Tensor, *, sigma2: float | None = None) -> tuple[int, float]:
    """``(rank, noise_variance)`` of a 2-D ``matrix`` by EVBMF (Nakajima et al. 2013).

    The rank is the raw EVB estimate, which is 0 when the matrix is indistinguishable from noise;
    :func:`kernel_vbmf_ranks` (what the planner uses) floors it at 1.
    """
    if matrix.dim() != 2:
        raise ValueError(f"evbmf needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError("evbmf: the matrix contains NaN or Inf values")
    s = torch.linalg.svdvals(matrix.detach().double())
    return evbmf_spectrum(s, tuple(matrix.shape), sigma2=sigma2)


def weaken(vbmf_rank: int, full_rank: int, weakening: float = 1.0) -> int:
    """musco's weakened rank ``R - w (R - r_vbmf)``, rounded up, floored at 1.

    ``weakening`` (w) in [0, 1]: 1 keeps the EVBMF rank, 0 the full rank ``R``.
    """
    if not 0 <= weakening <= 1:
        raise ValueError(f"weakening must be in [0, 1], got {weakening}")
    r = full_rank - weakening * (full_rank - vbmf_rank)
    return int(max(1, min(full_rank, math.ceil(r - 1e-9))))


def kernel_vbmf_ranks(method, spec, weight: torch.Tensor, weakening: float = 1.0,
                      spectra: list[torch.Tensor] | None = None) -> tuple[int, ...]:
    """Per-rank EVBMF ranks of a layer for ``method`` (floored at 1, weakened, clipped to max rank).

    Each of ``method.spectra(weight, spec)`` is the spectrum of one unfolding of the kernel (the
    mode-0 ``(N, C k^2)`` matrix for channel SVD; mode-0 and mode-1 for Tucker-2, as in Kim et
    al. 2016).  An unfolding of a group's kernel has ``numel / len(spectrum)`` columns; the
    largest rank over groups is taken.  ``spectra``: precomputed ``method.spectra(weight, spec)``.
    """
    numel = weight[: spec.out_per_group].numel()
    ranks = []
    if spectra is None:
        spectra = method.spectra(weight.detach().double(), spec)
    for spectrum, top in zip(spectra, method.max_rank(spec)):
        spectrum = spectrum.reshape(-1, spectrum.shape[-1])
        n = spectrum.shape[-1]
        m = max(n, numel // n)
        raw = max(evbmf_spectrum(row, (n, m))[0] for row in spectrum)
        ranks.append(min(top, weaken(raw, n, weakening)))
    return tuple(ranks)

"""Errors from singular spectra, and ranks by energy kept.

For a single-spectrum SVD method (channel SVD, spatial SVD, linear SVD), the squared relative
Frobenius error of the rank-r truncation is exactly the discarded energy fraction
``sum_{i>r} s_i^2 / sum_i s_i^2`` (Eckart-Young).  For a method with several spectra (Tucker-2's
mode-0 and mode-1 unfoldings) the sum of the discarded fractions bounds the truncated-HOSVD error
(De Lathauwer et al. 2000, Property 10); for other methods it is a proxy.

:func:`spectral_error_is_exact` reads that off the method: one rank, chosen from one spectrum
(``n_ranks == 1`` and ``supports_energy``), is a truncated SVD of the matrix that spectrum belongs to.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..methods.base import energy_rank

__all__ = ["discarded_fraction", "error_estimate", "energy_ranks", "energy_rank", "log_retained",
           "spectral_error_is_exact"]


def discarded_fraction(spectrum: torch.Tensor, rank: int) -> float:
    """Fraction of the squared singular values beyond ``rank``; ``spectrum: (groups, n)`` or ``(n,)``."""
    s2 = spectrum.double().pow(2).reshape(-1, spectrum.shape[-1])
    total = float(s2.sum())
    if total <= 0:
        return 0.0
    return float(s2[:, int(rank):].sum()) / total


def error_estimate(spectra: Sequence[torch.Tensor], ranks: Sequence[int]) -> float:
    """Relative kernel error estimate ``sqrt(sum_i discarded_i)``, clipped to [0, 1]."""
    d = sum(discarded_fraction(s, r) for s, r in zip(spectra, ranks))
    return math.sqrt(min(1.0, max(0.0, d)))


def spectral_error_is_exact(method) -> bool:
    """True when :func:`error_estimate` of ``method.spectra`` is the exact truncation error
    (Eckart-Young): a single rank, chosen from a single spectrum."""
    return method.n_ranks == 1 and bool(method.supports_energy)


def log_retained(spectra: Sequence[torch.Tensor], ranks: Sequence[int]) -> float:
    """``-log(retained energy)``: Zhang et al. 2016's per-layer objective (the product of PCA energies,
    eq. 13 of "Accelerating very deep convolutional networks ...", taken as a sum of logs)."""
    e = error_estimate(spectra, ranks) ** 2
    return -math.log(max(1e-12, 1.0 - e))


def energy_ranks(method, spec, weight: torch.Tensor, energy: float) -> tuple[int, ...]:
    """Smallest ranks keeping ``energy`` of each of the method's spectra."""
    return tuple(method.resolve_ranks(spec, weight, energy=energy))

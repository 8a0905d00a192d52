"""Channel SVD (Zhang et al., "Accelerating Very Deep Convolutional Networks for Classification
and Detection", TPAMI 2016, eq. 1-3; Denton et al. 2014): a kxk conv C->N becomes a kxk conv
C->r carrying stride, padding and dilation, then a 1x1 conv r->N carrying the bias.

Per group g the kernel is the matrix ``W_g: (N/g, C/g*kh*kw)``; its truncated SVD
``W_g ~ U_r S_r V_r^T`` is the optimal rank-r approximation (Eckart-Young), so the squared
Frobenius error equals the discarded squared singular values.  The singular values are split
evenly (``sqrt(S)`` to each side), which balances the factors for fine-tuning.

``linear_svd`` is the same math for ``nn.Linear`` and 1x1 convs: ``W: (out, in) ~ (U sqrt S)(sqrt S V^T)``.
The SVD is LAPACK's (:func:`.linalg.truncated_svd`), on the tall orientation of the matrix.

A transposed conv (``nn.ConvTranspose``, weight ``(C, N/g, *k)``) is factorized on its own weight
layout: per group ``W_g: (C/g, N/g*prod k) ~ A_g B_g`` with ``A_g: (C/g, r)``.  Since
``convT(x; W) = convT(A^T x; B)`` (the transposed conv mixes input channels linearly), the
replacement is a 1x1 conv C->r (``A^T``, at the input resolution) followed by a ConvTranspose
r->N (``B``) carrying stride, padding, output_padding, dilation and the bias.  This is the
channel SVD of the conv the transposed conv is the adjoint of, with the chain reversed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..spec.convspec import ConvSpec, UnsupportedLayer, make_conv
from .base import Cost, Factorized, Method, Ranks, copy_into
from .linalg import check_svd_options, grouped_matrix, singular_values, truncated_svd, truncated_svd_flops


@dataclass(frozen=True)
class ChannelSVD(Method):
    """Channel SVD.  ``svd``: ``"exact"`` (LAPACK), ``"gram"`` (eigendecomposition of the smaller Gram
    matrix) or ``"randomized"`` (seeded range finder, near-optimal; for large layers at ranks well
    below full); ``precision``: ``"float64"`` or ``"float32"`` for the decomposition.  Every choice is
    exact at full rank; the defaults are the tested exact float64 path."""

    svd: str = "exact"
    precision: str = "float64"
    name = "channel_svd"
    supports_linear = True
    supported_dims = (1, 2, 3)
    supports_transposed = True
    factor_names = ("first", "second")

    def __post_init__(self):
        check_svd_options(self.name, self.svd, self.precision)

    def full_rank(self, spec: ConvSpec) -> Ranks:
        rows, cols = spec.weight_shape[:2]     # (N, C/g) or, transposed, (C, N/g)
        return (min(rows // spec.groups, cols * spec.kernel_volume),)

    def spectra(self, weight: torch.Tensor, spec: ConvSpec) -> list[torch.Tensor]:
        return [singular_values(grouped_matrix(weight, spec.groups))]

    def factorization_cost(self, spec: ConvSpec, ranks: Ranks) -> float:
        """One truncated SVD per group of the ``(rows/g, cols prod(k))`` matrix, by its ``svd`` route."""
        rows, cols = spec.weight_shape[:2]
        return spec.groups * truncated_svd_flops(rows // spec.groups, cols * spec.kernel_volume, ranks[0], self.svd)

    def factorize(self, weight: torch.Tensor, spec: ConvSpec, ranks: Ranks, *,
                  calibration=None) -> dict[str, torch.Tensor]:
        """``weight: (N, C/g, *k)`` -> ``first: (g r, C/g, *k)``, ``second: (N, r)``; transposed,
        ``weight: (C, N/g, *k)`` -> ``first: (g r, C/g, 1..)`` (the 1x1), ``second: (g r, N/g, *k)``."""
        (r,) = ranks
        g = spec.groups
        left, right = truncated_svd(grouped_matrix(weight, g), r, svd=self.svd,
                                    precision=self.precision)           # (g, rows/g, r), (g, r, cols k)
        if spec.transposed:
            ones = (1,) * spec.dim
            return {"first": left.mT.reshape(g * r, spec.in_per_group, *ones),
                    "second": right.reshape(g * r, spec.out_per_group, *spec.kernel_size)}
        first = right.reshape(g * r, spec.in_per_group, *spec.kernel_size)
        second = left.reshape(spec.out_channels, r)
        return {"first": first, "second": second}

    def reconstruct(self, factors: dict[str, torch.Tensor], spec: ConvSpec) -> torch.Tensor:
        g = spec.groups
        if spec.transposed:
            first = factors["first"].reshape(g, -1, spec.in_per_group)                          # (g, r, C/g)
            second = factors["second"].reshape(g, first.shape[1], -1)                         # (g, r, N/g k)
            return (first.mT @ second).reshape(spec.weight_shape)
        first = factors["first"].reshape(g, -1, spec.in_per_group * spec.kernel_volume)   # (g, r, Ck)
        second = factors["second"].reshape(g, spec.out_per_group, -1)                    # (g, N/g, r)
        return (second @ first).reshape(spec.out_channels, spec.in_per_group, *spec.kernel_size)

    def build(self, spec: ConvSpec, ranks: Ranks, factors=None, *, dtype=None, device=None) -> Factorized:
        """kxk conv C->r then 1x1 r->N; transposed: 1x1 conv C->r then kxk ConvTranspose r->N."""
        (r,) = ranks
        g = spec.groups
        spatial = range(spec.dim)
        first = make_conv(spec, spec.in_channels, g * r, axes=() if spec.transposed else spatial, groups=g,
                          dtype=dtype, device=device)
        second = make_conv(spec, g * r, spec.out_channels, axes=spatial if spec.transposed else (), groups=g,
                           bias=spec.bias, dtype=dtype, device=device)
        if factors is not None:
            copy_into(first, factors["first"])
            copy_into(second, factors["second"], factors.get("bias"))
        return self.factorized(spec, ranks, first, second)

    def cost(self, spec: ConvSpec, ranks: Ranks, input_size: Sequence[int] = ()) -> Cost:
        """``r C/g k`` + ``N r`` per output pixel; transposed, ``C r`` + ``r N/g k`` per *input* pixel
        (the 1x1 runs before the upsampling, and a ConvTranspose costs its weight per input pixel)."""
        (r,) = ranks
        g = spec.groups
        bias = spec.out_channels if spec.bias else 0
        if spec.transposed:
            first, second = spec.in_channels * r, g * r * spec.out_per_group * spec.kernel_volume
            return Cost(params=first + second + bias, macs=math.prod(input_size) * (first + second))
        out = math.prod(spec.output_size(input_size))
        first = g * r * spec.in_per_group * spec.kernel_volume
        second = spec.out_channels * r
        return Cost(params=first + second + bias, macs=out * (first + second))


@dataclass(frozen=True)
class LinearSVD(ChannelSVD):
    """``nn.Linear`` (and 1x1 convs): ``W: (out, in)`` becomes ``in -> r`` then ``r -> out``."""

    name = "linear_svd"

    def check(self, spec: ConvSpec) -> None:
        if not spec.is_linear and not spec.is_pointwise:
            raise UnsupportedLayer(f"linear_svd: kernel {spec.kernel_size} is not 1x1 (use 'channel_svd')")
        super().check(spec)

"""Spatial SVD (Tai, Xiao, Zhang, Wang, E, "Convolutional neural networks with low-rank
regularization", ICLR 2016, Theorem 1): a kh x kw conv C->N becomes a vertical kh x 1 conv C->K
followed by a horizontal 1 x kw conv K->N.

Per group the kernel ``W: (N/g, C/g, kh, kw)`` is rearranged into the matrix

    M[(c, i), (j, n)] = W[n, c, i, j]        M: (C/g * kh, kw * N/g)

and the closed-form optimum of Theorem 1 is its truncated SVD ``M ~ U_K S_K V_K^T``: the vertical
filters are the columns of ``U_K sqrt(S_K)``, the horizontal ones the rows of ``sqrt(S_K) V_K^T``.
The squared Frobenius error is the sum of the discarded squared singular values (Eckart-Young);
the factorization is exact at ``K = min(C/g * kh, kw * N/g)``.

The vertical conv carries the original's stride / padding / dilation along axis 0 (H), the
horizontal one those of axis 1 (W) and the bias; both are grouped convs with the original ``groups``.
Padding modes are separable per axis, so every ``padding_mode`` stays exact (see
:mod:`convfactor.spec.convspec`).

The truncated SVD goes through the smaller Gram matrix (:func:`.linalg.truncated_factors`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..spec.convspec import ConvSpec, make_conv
from .base import Cost, Factorized, Method, Ranks, copy_into
from .linalg import gram_flops, gram_singular_values, truncated_factors

__all__ = ["SpatialSVD", "spatial_matrix", "spatial_kernel"]


# ---------------------------------------------------------------------------- kernel <-> matrix
def spatial_matrix(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``weight: (N, C/g, kh, kw)`` -> ``M: (g, C/g * kh, kw * N/g)`` with ``M[(c,i),(j,n)] = W[n,c,i,j]``."""
    n, cg, kh, kw = weight.shape
    w = weight.reshape(groups, n // groups, cg, kh, kw)                      # [g, n, c, i, j]
    return w.permute(0, 2, 3, 4, 1).reshape(groups, cg * kh, kw * (n // groups))


def spatial_kernel(matrix: torch.Tensor, out_channels: int, kernel_size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`spatial_matrix`: ``M: (g, C/g * kh, kw * N/g)`` -> ``(N, C/g, kh, kw)``."""
    g = matrix.shape[0]
    kh, kw = kernel_size
    ng = out_channels // g
    cg = matrix.shape[1] // kh
    w = matrix.reshape(g, cg, kh, kw, ng).permute(0, 4, 1, 2, 3)             # [g, n, c, i, j]
    return w.reshape(out_channels, cg, kh, kw)


@dataclass(frozen=True)
class SpatialSVD(Method):
    """Tai et al.'s vertical + horizontal pair; no options."""

    name = "spatial_svd"
    supported_dims = (2,)
    factor_names = ("vertical", "horizontal")

    def full_rank(self, spec: ConvSpec) -> Ranks:
        kh, kw = spec.kernel_size
        return (min(spec.in_per_group * kh, kw * spec.out_per_group),)

    def spectra(self, weight: torch.Tensor, spec: ConvSpec) -> list[torch.Tensor]:
        """Singular values of ``M`` per group: ``(g, full rank)`` (squared values accurate to eps)."""
        return [gram_singular_values(spatial_matrix(weight.double(), spec.groups))]

    def factorization_cost(self, spec: ConvSpec, ranks: Ranks) -> float:
        """Per group, the Gram route (:func:`.linalg.truncated_factors`) on ``M: (C/g kh, kw N/g)``."""
        kh, kw = spec.kernel_size
        return spec.groups * gram_flops(spec.in_per_group * kh, kw * spec.out_per_group)

    def factorize(self, weight: torch.Tensor, spec: ConvSpec, ranks: Ranks, *,
                  calibration=None) -> dict[str, torch.Tensor]:
        """``weight: (N, C/g, kh, kw)`` -> ``vertical: (g*K, C/g, kh, 1)``, ``horizontal: (N, K, 1, kw)``."""
        (k,) = ranks
        g = spec.groups
        kh, kw = spec.kernel_size
        cg, ng = spec.in_per_group, spec.out_per_group
        left, right = truncated_factors(spatial_matrix(weight, g), k)       # (g, cg*kh, K), (g, K, kw*ng)
        vertical = left.reshape(g, cg, kh, k).permute(0, 3, 1, 2).reshape(g * k, cg, kh, 1)
        horizontal = right.reshape(g, k, kw, ng).permute(0, 3, 1, 2).reshape(spec.out_channels, k, 1, kw)
        return {"vertical": vertical, "horizontal": horizontal}

    def reconstruct(self, factors: dict[str, torch.Tensor], spec: ConvSpec) -> torch.Tensor:
        g = spec.groups
        kh, kw = spec.kernel_size
        cg, ng = spec.in_per_group, spec.out_per_group
        vertical = factors["vertical"].reshape(g, -1, cg * kh)                               # (g, K, cg*kh)
        k = vertical.shape[1]
        horizontal = factors["horizontal"].reshape(g, ng, k, kw).permute(0, 2, 3, 1)         # (g, K, kw, ng)
        matrix = vertical.mT @ horizontal.reshape(g, k, kw * ng)
        return spatial_kernel(matrix, spec.out_channels, spec.kernel_size)

    def build(self, spec: ConvSpec, ranks: Ranks, factors=None, *, dtype=None, device=None) -> Factorized:
        (k,) = ranks
        g = spec.groups
        vertical = make_conv(spec, spec.in_channels, g * k, axes=(0,), groups=g, dtype=dtype, device=device)
        horizontal = make_conv(spec, g * k, spec.out_channels, axes=(1,), groups=g, bias=spec.bias,
                               dtype=dtype, device=device)
        if factors is not None:
            copy_into(vertical, factors["vertical"])
            copy_into(horizontal, factors["horizontal"], factors.get("bias"))
        return self.factorized(spec, ranks, vertical, horizontal)

    def cost(self, spec: ConvSpec, ranks: Ranks, input_size: Sequence[int] = ()) -> Cost:
        """Vertical: ``g K (C/g) kh`` MACs per pixel of the H-convolved map; horizontal: ``N K kw`` per output pixel."""
        (k,) = ranks
        kh, kw = spec.kernel_size
        mid = math.prod(spec.output_size(input_size, axes=(0,)))
        out = math.prod(spec.output_size(input_size))
        vertical = spec.groups * k * spec.in_per_group * kh
        horizontal = spec.out_channels * k * kw
        return Cost(params=vertical + horizontal + (spec.out_channels if spec.bias else 0),
                    macs=mid * vertical + out * horizontal)

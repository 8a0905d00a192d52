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
:mod:`convfactor.core.convspec`).

This module also holds the small linear-algebra helpers that :mod:`.tucker2` and :mod:`.depthwise`
use: a truncated SVD through the eigendecomposition of the *smaller* Gram matrix.  On this CPU
``torch.linalg.eigh`` of an n x n Gram matrix is one to two orders of magnitude faster than
``torch.linalg.svd`` of the wide matrix it comes from (0.05 s against 3-4 s for a 512 x 4608
float64 matrix), and the truncation it gives is optimal up to ``O(eps ||M||^2)`` in squared error.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..core.convspec import ConvSpec, make_conv
from .base import Cost, Factorized, Method, Ranks, copy_into

__all__ = ["SpatialSVD", "spatial_matrix", "spatial_kernel", "top_eigh", "gram_singular_values",
           "truncated_factors", "leading_left"]


# ---------------------------------------------------------------------------- linear algebra helpers
def top_eigh(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest ``rank`` eigenpairs of a batch of symmetric PSD matrices, in descending order.

    ``gram: (..., n, n)`` -> ``values: (..., rank)``, ``vectors: (..., n, rank)`` (orthonormal columns).
    """
    values, vectors = torch.linalg.eigh(gram)
    return values[..., -rank:].flip(-1), vectors[..., -rank:].flip(-1)


def gram_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a batch of matrices via the smaller Gram matrix.

    ``matrix: (..., m, n)`` -> ``(..., min(m, n))``, descending.  The *squared* values are accurate to
    ``O(eps * s_max^2)``, which is what energy fractions need; tiny singular values are not resolved.
    """
    m, n = matrix.shape[-2:]
    gram = matrix @ matrix.mT if m <= n else matrix.mT @ matrix
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()


def _balance_scale(s: torch.Tensor) -> torch.Tensor:
    """``sqrt(s)`` where ``s > 0``, else 1 (a zero direction stays zero on one side)."""
    return torch.where(s > 0, s.sqrt(), torch.ones_like(s))


def truncated_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of the optimal rank-``rank`` approximation of a batch of matrices.

    ``matrix: (..., m, n)`` -> ``left: (..., m, r)``, ``right: (..., r, n)`` with ``left @ right``
    the truncated SVD ``U_r S_r V_r^T`` and ``left = U_r sqrt(S_r)``, ``right = sqrt(S_r) V_r^T``.
    Computed from the eigenvectors of the smaller Gram matrix (``r <= min(m, n)``); the singular
    values are re-measured as the norms of the projected rows/columns, so no small eigenvalue is
    divided by and the product is exactly the projection of ``matrix`` onto the kept subspace.
    """
    m, n = matrix.shape[-2:]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} is out of range [1, {min(m, n)}] for a {m} x {n} matrix")
    if m <= n:
        _, u = top_eigh(matrix @ matrix.mT, rank)             # (..., m, r)
        right = u.mT @ matrix                                 # (..., r, n) = S_r V_r^T
        scale = _balance_scale(right.norm(dim=-1))            # (..., r)
        return u * scale.unsqueeze(-2), right / scale.unsqueeze(-1)
    _, v = top_eigh(matrix.mT @ matrix, rank)                 # (..., n, r)
    left = matrix @ v                                         # (..., m, r) = U_r S_r
    scale = _balance_scale(left.norm(dim=-2))
    return left / scale.unsqueeze(-2), v.mT * scale.unsqueeze(-1)


def leading_left(matrix: torch.Tensor, rank: int, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the top-``rank`` left singular subspace, and the energy it captures.

    ``matrix: (..., m, n)`` -> ``basis: (..., m, rank)`` (``rank <= m``), ``captured: (...)`` =
    ``||basis^T matrix||_F^2`` (the sum of the top ``rank`` squared singular values).  A tall matrix
    goes through its ``n x n`` Gram matrix and a QR; when ``rank > n`` the basis is completed with
    directions orthogonal to the column space (they capture nothing).
    """
    m, n = matrix.shape[-2:]
    if not 1 <= rank <= m:
        raise ValueError(f"rank {rank} is out of range [1, {m}]")
    if m <= n:
        values, u = top_eigh(matrix @ matrix.mT, rank)
        return u, values.clamp_min(0).sum(-1)
    k = min(rank, n)
    values, v = top_eigh(matrix.mT @ matrix, k)
    spanning = matrix @ v                                      # (..., m, k), columns ~ U_k S_k
    if rank > k:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        extra = torch.randn(*matrix.shape[:-1], rank - k, generator=generator, dtype=matrix.dtype)
        spanning = torch.cat([spanning, extra.to(matrix.device)], dim=-1)
    q, _ = torch.linalg.qr(spanning)
    return q, values.clamp_min(0).sum(-1)


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


class SpatialSVD(Method):
    name = "spatial_svd"
    supported_dims = (2,)
    factor_names = ("vertical", "horizontal")

    def full_rank(self, spec: ConvSpec) -> Ranks:
        kh, kw = spec.kernel_size
        return (min(spec.in_per_group * kh, kw * spec.out_per_group),)

    def spectra(self, weight: torch.Tensor, spec: ConvSpec) -> list[torch.Tensor]:
        """Singular values of ``M`` per group: ``(g, full rank)`` (squared values accurate to eps)."""
        return [gram_singular_values(spatial_matrix(weight.double(), spec.groups))]

    def factorize(self, weight: torch.Tensor, spec: ConvSpec, ranks: Ranks, **options) -> dict[str, torch.Tensor]:
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

    def build(self, spec: ConvSpec, ranks: Ranks, factors=None, *, dtype=None, device=None, **options) -> Factorized:
        (k,) = ranks
        g = spec.groups
        vertical = make_conv(spec, spec.in_channels, g * k, axes=(0,), groups=g, dtype=dtype, device=device)
        horizontal = make_conv(spec, g * k, spec.out_channels, axes=(1,), groups=g, bias=spec.bias,
                               dtype=dtype, device=device)
        if factors is not None:
            copy_into(vertical, factors["vertical"])
            copy_into(horizontal, factors["horizontal"], factors.get("bias"))
        return Factorized(vertical, horizontal, method=self.name, spec=spec, ranks=ranks)

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

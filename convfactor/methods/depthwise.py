"""Depthwise-separable factorization (MobileNet-style; Jaderberg, Vedaldi, Zisserman, "Speeding up
Convolutional Neural Networks with Low Rank Expansions", BMVC 2014, scheme 1; Wang, Li, Wang, Xu,
"Factorized Convolutional Neural Networks", ICCV-W 2017): a k-conv C->N becomes

    depthwise k conv C -> C r   (groups=C: r filters per input channel, every spatial option)
    1x1 conv       C r -> N     (groups = the original groups, with the bias)

which computes ``W_hat[n, c] = sum_j A_c[n, j] B_c[j]``: for every input channel ``c`` the slice of
the kernel over the output channels of ``c``'s group, ``W_c: (N/g, prod k)``, is replaced by a rank-r
matrix ``A_c B_c``.  The slices are independent, so the optimal fit (Eckart-Young, per slice) is the
truncated SVD of each, ``A_c = U_r sqrt(S_r)``, ``B_c = sqrt(S_r) V_r^T``; the squared error is the sum
over channels of the discarded squared singular values, and the factorization is exact at
``r = min(N/g, prod k)``.  Conv1d, Conv2d and Conv3d are supported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..spec.convspec import ConvSpec, make_conv
from .base import Cost, Factorized, Method, Ranks, copy_into
from .linalg import gram_flops, gram_singular_values, truncated_factors

__all__ = ["Depthwise", "channel_slices", "from_channel_slices"]


def channel_slices(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``weight: (N, C/g, *k)`` -> ``(C, N/g, kv)``: row ``c`` is input channel ``c``'s slice."""
    n, cg = weight.shape[:2]
    w = weight.reshape(groups, n // groups, cg, -1)              # [g, n, c, k]
    return w.transpose(1, 2).reshape(groups * cg, n // groups, w.shape[-1])


def from_channel_slices(slices: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Inverse of :func:`channel_slices`: ``(C, N/g, kv)`` -> ``(N, C/g, *k)``."""
    g, cg, ng = spec.groups, spec.in_per_group, spec.out_per_group
    w = slices.reshape(g, cg, ng, -1).transpose(1, 2)            # [g, n, c, k]
    return w.reshape(spec.out_channels, cg, *spec.kernel_size)


@dataclass(frozen=True)
class Depthwise(Method):
    """The rank is the depth multiplier r (filters per input channel); no options."""

    name = "depthwise"
    supported_dims = (1, 2, 3)
    factor_names = ("depthwise", "pointwise")

    def full_rank(self, spec: ConvSpec) -> Ranks:
        return (min(spec.out_per_group, spec.kernel_volume),)

    def spectra(self, weight: torch.Tensor, spec: ConvSpec) -> list[torch.Tensor]:
        """Singular values of each input channel's ``(N/g, kv)`` slice: ``(C, full rank)``."""
        return [gram_singular_values(channel_slices(weight.double(), spec.groups))]

    def factorization_cost(self, spec: ConvSpec, ranks: Ranks) -> float:
        """One Gram-route truncation (:func:`.linalg.truncated_factors`) per input channel's ``(N/g, kv)`` slice."""
        return spec.in_channels * gram_flops(spec.out_per_group, spec.kernel_volume)

    def factorize(self, weight: torch.Tensor, spec: ConvSpec, ranks: Ranks, *,
                  calibration=None) -> dict[str, torch.Tensor]:
        """``weight: (N, C/g, *k)`` -> ``depthwise: (C r, 1, *k)``, ``pointwise: (N, C/g r, 1..)``."""
        (r,) = ranks
        g, cg, ng = spec.groups, spec.in_per_group, spec.out_per_group
        a, b = truncated_factors(channel_slices(weight, g), r)        # (C, ng, r), (C, r, kv)
        depthwise = b.reshape(spec.in_channels * r, 1, *spec.kernel_size)
        pointwise = a.reshape(g, cg, ng, r).transpose(1, 2).reshape(spec.out_channels, cg * r, *(1,) * spec.dim)
        return {"depthwise": depthwise, "pointwise": pointwise}

    def reconstruct(self, factors: dict[str, torch.Tensor], spec: ConvSpec) -> torch.Tensor:
        g, cg, ng = spec.groups, spec.in_per_group, spec.out_per_group
        b = factors["depthwise"].reshape(spec.in_channels, -1, spec.kernel_volume)          # (C, r, kv)
        r = b.shape[1]
        a = factors["pointwise"].reshape(g, ng, cg, r).transpose(1, 2).reshape(spec.in_channels, ng, r)
        return from_channel_slices(a @ b, spec)

    def build(self, spec: ConvSpec, ranks: Ranks, factors=None, *, dtype=None, device=None) -> Factorized:
        (r,) = ranks
        c = spec.in_channels
        depthwise = make_conv(spec, c, c * r, axes=range(spec.dim), groups=c, dtype=dtype, device=device)
        pointwise = make_conv(spec, c * r, spec.out_channels, groups=spec.groups, bias=spec.bias,
                              dtype=dtype, device=device)
        if factors is not None:
            copy_into(depthwise, factors["depthwise"])
            copy_into(pointwise, factors["pointwise"], factors.get("bias"))
        return self.factorized(spec, ranks, depthwise, pointwise)

    def cost(self, spec: ConvSpec, ranks: Ranks, input_size: Sequence[int] = ()) -> Cost:
        """``C r kv + N (C/g) r`` MACs per output pixel."""
        (r,) = ranks
        depthwise = spec.in_channels * r * spec.kernel_volume
        pointwise = spec.out_channels * spec.in_per_group * r
        return Cost(params=depthwise + pointwise + (spec.out_channels if spec.bias else 0),
                    macs=math.prod(spec.output_size(input_size)) * (depthwise + pointwise))

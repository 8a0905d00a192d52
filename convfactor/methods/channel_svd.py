"""Channel SVD (Zhang et al., "Accelerating Very Deep Convolutional Networks for Classification
and Detection", TPAMI 2016, eq. 1-3; Denton et al. 2014): a kxk conv C->N becomes a kxk conv
C->r carrying stride, padding and dilation, then a 1x1 conv r->N carrying the bias.

Per group g the kernel is the matrix ``W_g: (N/g, C/g*kh*kw)``; its truncated SVD
``W_g ~ U_r S_r V_r^T`` is the optimal rank-r approximation (Eckart-Young), so the squared
Frobenius error equals the discarded squared singular values.  The singular values are split
evenly (``sqrt(S)`` to each side), which balances the factors for fine-tuning.

``linear_svd`` is the same math for ``nn.Linear`` and 1x1 convs: ``W: (out, in) ~ (U sqrt S)(sqrt S V^T)``.
The SVD is LAPACK's (:func:`.linalg.truncated_svd`), on the tall orientation of the matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..spec.convspec import ConvSpec, UnsupportedLayer, make_conv
from .base import Cost, Factorized, Method, Ranks, copy_into
from .linalg import singular_values, truncated_svd


def grouped_matrix(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``weight: (N, C/g, *k)`` -> ``(g, N/g, C/g * prod(k))``."""
    n = weight.shape[0]
    return weight.reshape(groups, n // groups, -1)


@dataclass(frozen=True)
class ChannelSVD(Method):
    """Channel SVD; no options."""

    name = "channel_svd"
    supports_linear = True
    supported_dims = (1, 2, 3)
    factor_names = ("first", "second")

    def full_rank(self, spec: ConvSpec) -> Ranks:
        return (min(spec.out_per_group, spec.in_per_group * spec.kernel_volume),)

    def spectra(self, weight: torch.Tensor, spec: ConvSpec) -> list[torch.Tensor]:
        return [singular_values(grouped_matrix(weight, spec.groups))]

    def factorize(self, weight: torch.Tensor, spec: ConvSpec, ranks: Ranks, *,
                  calibration=None) -> dict[str, torch.Tensor]:
        """``weight: (N, C/g, *k)`` -> ``first: (g r, C/g, *k)``, ``second: (N, r)``."""
        (r,) = ranks
        left, right = truncated_svd(grouped_matrix(weight, spec.groups), r)   # (g, N/g, r), (g, r, Ck)
        first = right.reshape(spec.groups * r, spec.in_per_group, *spec.kernel_size)
        second = left.reshape(spec.out_channels, r)
        return {"first": first, "second": second}

    def reconstruct(self, factors: dict[str, torch.Tensor], spec: ConvSpec) -> torch.Tensor:
        g = spec.groups
        first = factors["first"].reshape(g, -1, spec.in_per_group * spec.kernel_volume)   # (g, r, Ck)
        second = factors["second"].reshape(g, spec.out_per_group, -1)                    # (g, N/g, r)
        return (second @ first).reshape(spec.out_channels, spec.in_per_group, *spec.kernel_size)

    def build(self, spec: ConvSpec, ranks: Ranks, factors=None, *, dtype=None, device=None) -> Factorized:
        (r,) = ranks
        g = spec.groups
        first = make_conv(spec, spec.in_channels, g * r, axes=range(spec.dim), groups=g, dtype=dtype, device=device)
        second = make_conv(spec, g * r, spec.out_channels, groups=g, bias=spec.bias, dtype=dtype, device=device)
        if factors is not None:
            copy_into(first, factors["first"])
            copy_into(second, factors["second"], factors.get("bias"))
        return self.factorized(spec, ranks, first, second)

    def cost(self, spec: ConvSpec, ranks: Ranks, input_size: Sequence[int] = ()) -> Cost:
        (r,) = ranks
        g = spec.groups
        out = math.prod(spec.output_size(input_size))
        first = g * r * spec.in_per_group * spec.kernel_volume
        second = spec.out_channels * r
        return Cost(params=first + second + (spec.out_channels if spec.bias else 0), macs=out * (first + second))


@dataclass(frozen=True)
class LinearSVD(ChannelSVD):
    """``nn.Linear`` (and 1x1 convs): ``W: (out, in)`` becomes ``in -> r`` then ``r -> out``."""

    name = "linear_svd"

    def check(self, spec: ConvSpec) -> None:
        if not spec.is_linear and not spec.is_pointwise:
            raise UnsupportedLayer(f"linear_svd: kernel {spec.kernel_size} is not 1x1 (use 'channel_svd')")
        super().check(spec)

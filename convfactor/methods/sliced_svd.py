"""Multi-subspace channel SVD: ALDS's channel slicing (Liebenwein, Maalouf, Gal, Feldman, Rus,
"Compressing Neural Networks: Towards Determining the Optimal Layer-wise Decomposition", NeurIPS
2021, Sec. 3, eq. 2-3).

The input channels are cut into ``slices`` contiguous slices and each slice gets its own rank-r
channel SVD.  Per original group and slice j the kernel matrix is
``W_j: (N/g, C/(g s) * prod k)`` (output channels by the slice's input channels times the kernel
taps); ``W = [W_1 ... W_s]`` and ``W x = sum_j W_j x_j``, so with ``W_j ~ U_j V_j`` (truncated SVD,
optimal per slice by Eckart-Young):

* a kxk conv ``C -> g s r`` with ``groups = g s`` holds every ``V_j`` (it carries stride, padding and
  dilation);
* a 1x1 conv ``g s r -> N`` with ``groups = g`` holds ``[U_1 ... U_s]`` per group and adds the slices'
  outputs up (it carries the bias).

The squared Frobenius error is the sum over slices of each slice's discarded squared singular
values; at full rank (``min(N/g, C/(g s) prod k)`` per slice) the layer is exact.  Per output pixel
the cost is ``r C k`` + ``N s r`` MACs against plain channel SVD's ``r C k + N r``: for a 3x3
conv the slices add little cost but give ``s`` times the total rank, which is the point (ALDS picks
``s`` and ``r`` per layer).  ``slices=1`` is plain channel SVD.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..spec.convspec import ConvSpec, UnsupportedLayer, make_conv
from .base import Cost, Factorized, Method, Ranks, copy_into
from .linalg import check_svd_options, singular_values, truncated_svd, truncated_svd_flops


def sliced_matrices(weight: torch.Tensor, groups: int, slices: int) -> torch.Tensor:
    """``weight: (N, C/g, *k)`` -> ``(g s, N/g, C/(g s) * prod k)``: per group, per input slice."""
    n, cg = weight.shape[:2]
    per = weight.reshape(groups, n // groups, slices, cg // slices, -1)      # (g, N/g, s, C/(gs), k)
    return per.permute(0, 2, 1, 3, 4).reshape(groups * slices, n // groups, -1)


@dataclass(frozen=True)
class SlicedSVD(Method):
    """Channel SVD per input-channel slice.  ``slices``: how many (must divide ``C / groups``);
    ``svd`` / ``precision`` as for ``channel_svd``."""

    slices: int = 2
    svd: str = "exact"
    precision: str = "float64"
    name = "sliced_svd"
    supported_dims = (1, 2, 3)
    factor_names = ("first", "second")

    def __post_init__(self):
        if not isinstance(self.slices, int) or isinstance(self.slices, bool) or self.slices < 1:
            raise ValueError(f"sliced_svd: slices must be a positive int, got {self.slices!r}")
        check_svd_options(self.name, self.svd, self.precision)

    def check(self, spec: ConvSpec) -> None:
        if spec.is_linear:
            raise UnsupportedLayer("sliced_svd: nn.Linear is not supported (use 'linear_svd')")
        if spec.in_per_group % self.slices:
            raise UnsupportedLayer(f"sliced_svd: {self.slices} slices do not divide the {spec.in_per_group} "
                                   "input channels per group")
        super().check(spec)

    def full_rank(self, spec: ConvSpec) -> Ranks:
        return (min(spec.out_per_group, spec.in_per_group // self.slices * spec.kernel_volume),)

    def spectra(self, weight: torch.Tensor, spec: ConvSpec) -> list[torch.Tensor]:
        return [singular_values(sliced_matrices(weight, spec.groups, self.slices))]

    def factorization_cost(self, spec: ConvSpec, ranks: Ranks) -> float:
        """One truncated SVD per group and slice of the ``(N/g, C/(g s) prod(k))`` matrix."""
        s = self.slices
        cols = spec.in_per_group // s * spec.kernel_volume
        return spec.groups * s * truncated_svd_flops(spec.out_per_group, cols, ranks[0], self.svd)

    def factorize(self, weight: torch.Tensor, spec: ConvSpec, ranks: Ranks, *,
                  calibration=None) -> dict[str, torch.Tensor]:
        """``weight: (N, C/g, *k)`` -> ``first: (g s r, C/(g s), *k)``, ``second: (N, s r)``."""
        (r,) = ranks
        g, s = spec.groups, self.slices
        left, right = truncated_svd(sliced_matrices(weight, g, s), r, svd=self.svd,
                                    precision=self.precision)       # (g s, N/g, r), (g s, r, C/(gs) k)
        first = right.reshape(g * s * r, spec.in_per_group // s, *spec.kernel_size)
        second = left.reshape(g, s, spec.out_per_group, r).permute(0, 2, 1, 3).reshape(spec.out_channels, s * r)
        return {"first": first, "second": second}

    def reconstruct(self, factors: dict[str, torch.Tensor], spec: ConvSpec) -> torch.Tensor:
        g, s = spec.groups, self.slices
        first = factors["first"].reshape(g, s, -1, spec.in_per_group // s * spec.kernel_volume)   # (g, s, r, Ck/s)
        r = first.shape[2]
        second = factors["second"].reshape(g, spec.out_per_group, s, r).permute(0, 2, 1, 3)       # (g, s, N/g, r)
        per_slice = second @ first                                                               # (g, s, N/g, Ck/s)
        kernel = per_slice.reshape(g, s, spec.out_per_group, spec.in_per_group // s, *spec.kernel_size)
        return kernel.transpose(1, 2).reshape(spec.out_channels, spec.in_per_group, *spec.kernel_size)

    def build(self, spec: ConvSpec, ranks: Ranks, factors=None, *, dtype=None, device=None) -> Factorized:
        """kxk conv C -> g s r (groups g s), then 1x1 g s r -> N (groups g)."""
        (r,) = ranks
        g, s = spec.groups, self.slices
        first = make_conv(spec, spec.in_channels, g * s * r, axes=range(spec.dim), groups=g * s,
                          dtype=dtype, device=device)
        second = make_conv(spec, g * s * r, spec.out_channels, groups=g, bias=spec.bias, dtype=dtype, device=device)
        if factors is not None:
            copy_into(first, factors["first"])
            copy_into(second, factors["second"], factors.get("bias"))
        return self.factorized(spec, ranks, first, second)

    def cost(self, spec: ConvSpec, ranks: Ranks, input_size: Sequence[int] = ()) -> Cost:
        """``r C k`` (every slice's kxk conv) + ``N s r`` (the 1x1 over all slices) per output pixel."""
        (r,) = ranks
        s = self.slices
        first = spec.groups * s * r * (spec.in_per_group // s) * spec.kernel_volume
        second = spec.out_channels * s * r
        bias = spec.out_channels if spec.bias else 0
        return Cost(params=first + second + bias, macs=math.prod(spec.output_size(input_size)) * (first + second))

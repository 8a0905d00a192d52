"""Tucker-2 (Kim, Park, Yoo, Choi, Yang, Shin, "Compression of Deep Convolutional Neural Networks
for Fast and Low Power Mobile Applications", ICLR 2016, eq. 4-7): a k-conv C->N becomes

    1x1 conv C -> r1   (U1^T, the input-channel factor)
    k   conv r1 -> r2  (the core, carrying stride / padding / dilation / padding_mode)
    1x1 conv r2 -> N   (U2, the output-channel factor, with the bias)

Per group the kernel ``T: (N/g, C/g, *k)`` is approximated by the Tucker-2 decomposition

    T ~ G x_N U2 x_C U1,       U1: (C/g, r1), U2: (N/g, r2) orthonormal,  G: (r2, r1, *k)

with only the two channel modes truncated (the spatial modes never are).  For orthonormal factors
the best core is ``G = T x_N U2^T x_C U1^T`` and ``||T - T_hat||^2 = ||T||^2 - ||G||^2`` (De Lathauwer,
De Moor, Vandewalle, "On the best rank-(R1,...,RN) approximation of higher-order tensors", SIMAX 2000).

Initialization is the truncated HOSVD factor ``U2`` (the leading left singular vectors of the
mode-N unfolding ``(N/g, C/g * prod k)``), refined by HOOI (same paper, Algorithm 4.2): alternately
``U1`` <- leading ``r1`` left singular vectors of ``T x_N U2^T`` unfolded along C, and ``U2`` <- leading
``r2`` of ``T x_C U1^T`` unfolded along N.  (The HOSVD ``U1`` is not computed: the first half-step
replaces it by the best ``U1`` for the HOSVD ``U2``.)  Each half-step maximizes ``||G||`` over one
factor with the other fixed, so the error never increases and is never above the HOSVD's.  The error
after a half-step is free (``||T||^2`` minus the captured eigenvalues); iterations stop when one
half-step lowers the squared error by less than ``hooi_tol`` (relative, default 1e-2) or after
``hooi_iters`` sweeps (default 5); ``hooi_iters=0`` gives the plain truncated HOSVD.  When one
channel mode keeps its whole column space, or the kernel is 1x1 (a matrix), the first half-step is
already the global optimum and nothing more runs.

The leading singular vectors come from the eigendecomposition of the smaller Gram matrix (see
:func:`convfactor.methods.spatial_svd.leading_left`): ``torch.linalg.svd`` of the 512 x 4608
unfolding of a 512x512x3x3 kernel took 3-4 s here, against 0.05 s for Gram + eigh.
Conv1d, Conv2d and Conv3d are supported, and their transposed versions: a ``ConvTranspose`` weight
``(C, N/g, *k)`` holds the same per-group kernel ``T[n, c, k]`` with the channel axes swapped, so the
decomposition is the same; the core becomes a ConvTranspose ``r1 -> r2`` carrying stride, padding,
output_padding and dilation between the two 1x1 convs (exact because the 1x1 channel mixes commute
with the transposed conv's spatial scatter, see :mod:`convfactor.spec.convspec`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..spec.convspec import ConvSpec, make_conv
from .base import Cost, Factorized, Method, Ranks, copy_into
from .linalg import gram_flops, gram_singular_values, leading_left

__all__ = ["Tucker2", "tucker2", "unfold_out", "unfold_in", "HOOI_SWEEPS_COUNTED"]

#: HOOI sweeps :meth:`Tucker2.factorization_cost` counts at most (HOOI usually stops within them, see ``hooi_tol``)
HOOI_SWEEPS_COUNTED = 3


def unfold_out(t: torch.Tensor) -> torch.Tensor:
    """Mode-N unfolding: ``(g, n, c, kv)`` -> ``(g, n, c * kv)``."""
    return t.reshape(t.shape[0], t.shape[1], -1)


def unfold_in(t: torch.Tensor) -> torch.Tensor:
    """Mode-C unfolding: ``(g, n, c, kv)`` -> ``(g, c, n * kv)``."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def tucker2(t: torch.Tensor, r1: int, r2: int, *, iters: int = 5, tol: float = 1e-2
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Tucker-2 of a batch of 3-way kernels (one per group).

    ``t: (g, N/g, C/g, kv)`` -> ``u1: (g, C/g, r1)``, ``core: (g, r2, r1, kv)``, ``u2: (g, N/g, r2)``
    and ``info`` (``"errors"``: squared Frobenius errors, summed over groups, after each half-step;
    ``"sweeps"``: HOOI sweeps run).  ``iters=0``: truncated HOSVD, no refinement.
    """
    g, ng, cg, kv = t.shape
    full1, full2 = min(cg, ng * kv), min(ng, cg * kv)
    if iters > 0 and r2 >= full2 and r1 < full1:
        # Mode N untruncated: solve the mirrored problem (channels swapped), where it is mode C.
        u1_, core_, u2_, info = tucker2(t.transpose(1, 2), r2, r1, iters=iters, tol=tol)
        return u2_, core_.transpose(1, 2).contiguous(), u1_, info
    fit = _Unfoldings(t)
    if iters == 0:
        (u1, u2), errors, sweeps = fit.hosvd(r1, r2), [], 0
    else:
        # When mode C keeps its whole column space, or the kernel is a matrix (kv = 1), the first
        # half-step is already the global optimum.
        u1, u2, errors, sweeps = fit.hooi(r1, r2, iters, tol, exact=r1 >= full1 or kv == 1)
    core = fit.core(u1, u2)
    if not errors:
        errors.append(float(fit.norm2 - core.pow(2).sum()))
    return u1, core, u2, {"errors": errors, "sweeps": sweeps}


class _Unfoldings:
    """The two channel unfoldings of ``t: (g, n, c, kv)`` and the projections HOOI alternates.

    Working layout (g, n, kv, c): both channel contractions are then plain batched matmuls.  The
    columns of an unfolding come out permuted, which changes neither its Gram matrix nor its left
    singular vectors.  The last projection computed is kept, so the core costs one more matmul.
    """

    def __init__(self, t: torch.Tensor):
        self.g, self.ng, self.cg, self.kv = t.shape
        self.norm2 = t.pow(2).sum()
        tk = t.transpose(2, 3).contiguous()
        self.out_mat = tk.reshape(self.g, self.ng, self.kv * self.cg)          # mode-N unfolding (permuted)
        self.in_rows = tk.reshape(self.g, self.ng * self.kv, self.cg)          # mode-C unfolding, transposed
        self.y1 = self.y2 = None

    def eye(self, n: int) -> torch.Tensor:
        return torch.eye(n, dtype=self.out_mat.dtype, device=self.out_mat.device).expand(self.g, n, n)

    def project_out(self, u2):   # t x_N U2^T, as the transposed mode-C unfolding (g, r2 kv, cg)
        self.y1, self.y2 = (u2.mT @ self.out_mat).reshape(self.g, -1, self.cg), None
        return self.y1

    def project_in(self, u1):    # t x_C U1^T, as the mode-N unfolding (g, ng, kv r1)
        self.y1, self.y2 = None, (self.in_rows @ u1).reshape(self.g, self.ng, -1)
        return self.y2

    def hosvd(self, r1: int, r2: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncated HOSVD (De Lathauwer et al. 2000): each factor from its own unfolding."""
        u1 = self.eye(self.cg) if r1 == self.cg else leading_left(self.in_rows.mT, r1)[0]
        u2 = self.eye(self.ng) if r2 == self.ng else leading_left(self.out_mat, r2)[0]
        return u1, u2

    def hooi(self, r1: int, r2: int, iters: int, tol: float, exact: bool):
        """HOOI (De Lathauwer et al. 2000, Alg. 4.2) from the HOSVD ``U2``: ``(u1, u2, errors, sweeps)``."""
        u2, _ = leading_left(self.out_mat, r2)
        errors: list[float] = []
        sweeps = 0
        for sweeps in range(1, iters + 1):
            y1 = self.project_out(u2)
            if r1 == self.cg:
                u1, captured = self.eye(self.cg), y1.pow(2).sum((1, 2))
            else:
                u1, captured = leading_left(y1.mT, r1)
            errors.append(float(self.norm2 - captured.sum()))
            if exact or _converged(errors, tol):
                break
            u2, captured = leading_left(self.project_in(u1), r2)
            errors.append(float(self.norm2 - captured.sum()))
            if _converged(errors, tol):
                break
        return u1, u2, errors, sweeps

    def core(self, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
        """``U2^T t U1`` from whichever projection is at hand, as ``(g, r2, r1, kv)``."""
        r1 = u1.shape[-1]
        if self.y1 is not None:
            core = self.y1 @ u1                                                   # (g, r2 kv, r1)
        else:
            core = u2.mT @ (self.project_in(u1) if self.y2 is None else self.y2)  # (g, r2, kv r1)
        return core.reshape(self.g, -1, self.kv, r1).transpose(2, 3).contiguous()


def _converged(errors: list[float], tol: float) -> bool:
    if len(errors) < 2:
        return errors[-1] <= 0
    prev, cur = errors[-2], errors[-1]
    return prev <= 0 or (prev - cur) <= tol * prev


@dataclass(frozen=True)
class Tucker2(Method):
    """Options: ``hooi_iters`` (HOOI sweeps, 0 = truncated HOSVD) and ``hooi_tol`` (relative error
    decrease below which HOOI stops); see :func:`tucker2`."""

    hooi_iters: int = 5
    hooi_tol: float = 1e-2

    name = "tucker2"
    n_ranks = 2
    rank_names = ("r1", "r2")          # r1: input-channel mode C, r2: output-channel mode N
    supported_dims = (1, 2, 3)
    supports_transposed = True
    factor_names = ("first", "core", "last")

    def __post_init__(self):
        if isinstance(self.hooi_iters, bool) or not isinstance(self.hooi_iters, int) or self.hooi_iters < 0:
            raise ValueError(f"{self.name}: hooi_iters must be an int >= 0, got {self.hooi_iters!r}")
        if isinstance(self.hooi_tol, bool) or not isinstance(self.hooi_tol, (int, float)) or self.hooi_tol < 0:
            raise ValueError(f"{self.name}: hooi_tol must be a number >= 0, got {self.hooi_tol!r}")

    # ------------------------------------------------------------------ rank arithmetic
    def full_rank(self, spec: ConvSpec) -> Ranks:
        cg, ng, kv = spec.in_per_group, spec.out_per_group, spec.kernel_volume
        return (min(cg, ng * kv), min(ng, cg * kv))

    def expand_rank(self, spec: ConvSpec, rank) -> Ranks:
        """An int ``r`` means ``(r, r)``, each clipped to its mode's full rank; ``1 <= r <= max(full ranks)``."""
        if isinstance(rank, int) and not isinstance(rank, bool):
            top = self.full_rank(spec)
            if not 1 <= rank <= max(top):
                raise ValueError(f"{self.name}: rank={rank} is out of range [1, {max(top)}] for this layer "
                                 f"(C={spec.in_channels}, N={spec.out_channels}, kernel={spec.kernel_size}, "
                                 f"groups={spec.groups}; full ranks (r1, r2) = {top})")
            return tuple(min(rank, m) for m in top)
        return super().expand_rank(spec, rank)

    def scaled_ranks(self, spec: ConvSpec, t: float) -> Ranks:
        """``(t C/g, t N/g)`` rounded up and clipped to the full ranks."""
        return tuple(max(1, min(m, math.ceil(t * d)))
                     for m, d in zip(self.full_rank(spec), (spec.in_per_group, spec.out_per_group)))

    def factorization_cost(self, spec: ConvSpec, ranks: Ranks) -> float:
        """Per HOOI sweep (De Lathauwer et al. 2000, Alg. 4.2; at most :data:`HOOI_SWEEPS_COUNTED`, one
        for the HOSVD) and group, a Gram basis of each channel unfolding (:func:`.linalg.leading_left`)."""
        cg, ng, kv = spec.in_per_group, spec.out_per_group, spec.kernel_volume
        sweeps = 1 + min(self.hooi_iters, HOOI_SWEEPS_COUNTED - 1)
        return sweeps * spec.groups * (gram_flops(ng, cg * kv) + gram_flops(cg, ng * kv))

    # ------------------------------------------------------------------ the four pieces
    def spectra(self, weight: torch.Tensor, spec: ConvSpec) -> list[torch.Tensor]:
        """Per group, singular values of the mode-C ``(C/g, N/g kv)`` and mode-N ``(N/g, C/g kv)`` unfoldings."""
        t = _grouped(weight.double(), spec)
        return [gram_singular_values(unfold_in(t)), gram_singular_values(unfold_out(t))]

    def factorize(self, weight: torch.Tensor, spec: ConvSpec, ranks: Ranks, *,
                  calibration=None) -> dict[str, torch.Tensor]:
        """``weight: (N, C/g, *k)`` -> ``first: (g r1, C/g, 1..)``, ``core: (g r2, r1, *k)``, ``last: (N, r2, 1..)``.

        Transposed (``weight: (C, N/g, *k)``): the core is a ConvTranspose weight ``(g r1, r2, *k)``."""
        r1, r2 = ranks
        g = spec.groups
        ones = (1,) * spec.dim
        u1, core, u2, _ = tucker2(_grouped(weight, spec), r1, r2, iters=self.hooi_iters,
                                  tol=float(self.hooi_tol))
        core = core.transpose(1, 2).reshape(g * r1, r2, *spec.kernel_size) if spec.transposed \
            else core.reshape(g * r2, r1, *spec.kernel_size)
        return {"first": u1.mT.reshape(g * r1, spec.in_per_group, *ones), "core": core,
                "last": u2.reshape(spec.out_channels, r2, *ones)}

    def reconstruct(self, factors: dict[str, torch.Tensor], spec: ConvSpec) -> torch.Tensor:
        g, cg, ng = spec.groups, spec.in_per_group, spec.out_per_group
        first = factors["first"].reshape(g, -1, cg)                               # (g, r1, cg)
        r1 = first.shape[1]
        if spec.transposed:                                                       # (g r1, r2, *k)
            core = factors["core"].reshape(g, r1, -1, spec.kernel_volume).transpose(1, 2)
        else:
            core = factors["core"].reshape(g, -1, r1, spec.kernel_volume)         # (g, r2, r1, kv)
        last = factors["last"].reshape(g, ng, -1)                                 # (g, ng, r2)
        if spec.transposed:
            return torch.einsum("gnb,gbak,gac->gcnk", last, core, first).reshape(spec.weight_shape)
        t = torch.einsum("gnb,gbak,gac->gnck", last, core, first)
        return t.reshape(spec.out_channels, cg, *spec.kernel_size)

    def build(self, spec: ConvSpec, ranks: Ranks, factors=None, *, dtype=None, device=None) -> Factorized:
        r1, r2 = ranks
        g = spec.groups
        first = make_conv(spec, spec.in_channels, g * r1, groups=g, dtype=dtype, device=device)
        core = make_conv(spec, g * r1, g * r2, axes=range(spec.dim), groups=g, dtype=dtype, device=device)
        last = make_conv(spec, g * r2, spec.out_channels, groups=g, bias=spec.bias, dtype=dtype, device=device)
        if factors is not None:
            copy_into(first, factors["first"])
            copy_into(core, factors["core"])
            copy_into(last, factors["last"], factors.get("bias"))
        return self.factorized(spec, ranks, first, core, last)

    def cost(self, spec: ConvSpec, ranks: Ranks, input_size: Sequence[int] = ()) -> Cost:
        """``C r1`` MACs per input pixel, ``g r2 r1 kv + N r2`` per output pixel (the first 1x1 runs unstrided).

        Transposed: the core's ``g r1 r2 kv`` is per *input* pixel (a ConvTranspose scatters each one)."""
        r1, r2 = ranks
        g = spec.groups
        pixels_in = math.prod(input_size)
        pixels_out = math.prod(spec.output_size(input_size))
        first = spec.in_channels * r1
        core = g * r2 * r1 * spec.kernel_volume
        last = spec.out_channels * r2
        core_pixels = pixels_in if spec.transposed else pixels_out
        return Cost(params=first + core + last + (spec.out_channels if spec.bias else 0),
                    macs=pixels_in * first + core_pixels * core + pixels_out * last)


def _grouped(weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """``(N, C/g, *k)`` -> ``(g, N/g, C/g, kv)``; a transposed conv's ``(C, N/g, *k)`` -> the same."""
    if spec.transposed:
        return weight.reshape(spec.groups, spec.in_per_group, spec.out_per_group, spec.kernel_volume).transpose(1, 2)
    return weight.reshape(spec.groups, spec.out_per_group, spec.in_per_group, spec.kernel_volume)

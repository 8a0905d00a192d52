"""Low-rank + sparse: the lecture's unified framework (Yu, Liu, Wang, Tao, "On Compressing Deep Models by
Low Rank and Sparse Decomposition", CVPR 2017, sec. 3), with column-sparse A and low-rank B::

    min_{A, B}  1/2 ||Y - (A + B) X||^2  +  lam_sparse ||A||_{2,1}  +  lam_lowrank ||B||_*

``W: (N, C k)`` is the layer's matrix, ``X: (C k, P)`` im2col patches of its inputs and ``Y = W X``;
``||A||_{2,1}`` sums the Frobenius norms of A's *input-channel groups* (the k columns of one input
channel), so a zero group is an input channel the sparse branch never reads.  Without calibration
``X X^T = I`` (weight approximation).  Only ``G = X X^T / P`` is needed (``Y X^T = W G``).

Solver: ADMM (Boyd et al. 2011, sec. 3.1) on the split ``P = A, Q = B``: a closed-form
quadratic (P, Q)-step with one precomputed ``(2G + rho I)^-1``, then the two proximal steps in
closed form, group (column) shrinkage for ``||.||_{2,1}`` and singular value thresholding
(Cai, Candes, Shen 2010) for ``||.||_*``.  The target ranks are then enforced (the ``channels``
groups with the largest response ``||A_c X_c||`` and the top-``rank`` part of B) and the fixed
structure is refitted by alternating exact minimizations (B: a response-weighted truncated SVD,
Zhang et al. 2016 sec. 3.1; A: least squares on the kept channels), which never increases the error.

Deployed (:class:`LowRankSparseConv`) as the sum of a low-rank branch (channel-SVD chain kxk C->r,
1x1 r->N carrying the bias) and a sparse branch (``index_select`` of the kept input channels, then
a kxk conv channels->N), both with every conv option of the original.  Ranks: ``(rank, channels)``,
``channels = 0`` meaning no sparse branch (so the full rank ``(min(N, C k), 0)`` is exact).
Options: ``lam_sparse``, ``lam_lowrank`` (relative to the largest singular value of ``W G^1/2``,
default 0.05 each), ``admm_iters`` (300), ``refit_iters`` (20), ``sparse_fraction`` (share of a
``macs_ratio`` budget given to the sparse branch, default 0.25), ``ridge`` (1e-8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..spec.convspec import ConvSpec, UnsupportedLayer, conv_of, make_conv
from .base import Cost, Factorized, Method, Ranks, check_target, copy_into, default_input_size
from .data_aware import patches

__all__ = ["LowRankSparse", "LowRankSparseConv", "admm_lowrank_sparse", "refit_structure", "group_shrink", "svt",
           "input_gram"]


# ---------------------------------------------------------------------------- proximal operators
def svt(m: torch.Tensor, tau: float) -> torch.Tensor:
    """Singular value thresholding: ``argmin_B 1/2 ||B - m||^2 + tau ||B||_*``."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u * (s - tau).clamp(min=0)) @ vh


def group_shrink(m: torch.Tensor, groups: int, tau: float) -> torch.Tensor:
    """``argmin_A 1/2 ||A - m||^2 + tau sum_c ||A_c||``, ``A_c`` the c-th of ``groups`` equal column blocks."""
    n, cols = m.shape
    blocks = m.reshape(n, groups, cols // groups)
    norms = blocks.pow(2).sum((0, 2), keepdim=True).sqrt()
    scale = (1 - tau / norms.clamp_min(1e-300)).clamp(min=0)
    return (blocks * scale).reshape(n, cols)


def _psd_sqrt(g: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(g)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def _group_response_norms(a: torch.Tensor, gram: torch.Tensor, groups: int) -> torch.Tensor:
    """``||A_c X_c||`` per channel group c: ``sqrt(tr(A_c G_cc A_c^T))``."""
    n, cols = a.shape
    k = cols // groups
    blocks = a.reshape(n, groups, k)
    g = gram.reshape(groups, k, groups, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)   # (groups, k, k)
    return torch.einsum("ngk,gkl,ngl->g", blocks, g, blocks).clamp(min=0).sqrt()


# ---------------------------------------------------------------------------- the solver
def admm_lowrank_sparse(weight: torch.Tensor, gram: torch.Tensor, groups: int, lam_sparse: float,
                        lam_lowrank: float, *, rho: float | None = None, iters: int = 300,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM for ``min 1/2 tr((W - A - B) G (W - A - B)^T) + lam_sparse ||A||_{2,1} + lam_lowrank ||B||_*``.

    ``weight: (N, D)``, ``gram: (D, D)`` (PSD), ``groups`` column groups of A (D divisible).
    Returns ``(A, B)``.  (P, Q)-step: stationarity of ``1/2||(W-P-Q)X||^2 + rho/2 ||P-a||^2 + rho/2 ||Q-b||^2``
    gives ``P - Q = a - b`` and ``(P + Q)(2G + rho I) = 2WG + rho (a + b)``.
    """
    d = weight.shape[1]
    if rho is None:
        rho = float(gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(d, dtype=weight.dtype, device=weight.device)
    inv = torch.linalg.inv(2 * gram + rho * eye)
    wg2 = 2 * weight @ gram
    a = torch.zeros_like(weight)
    b = torch.zeros_like(weight)
    u1 = torch.zeros_like(weight)
    u2 = torch.zeros_like(weight)
    for _ in range(iters):
        pa, pb = a - u1, b - u2
        s = (wg2 + rho * (pa + pb)) @ inv
        c = pa - pb
        p, q = (s + c) / 2, (s - c) / 2
        a = group_shrink(p + u1, groups, lam_sparse / rho)
        b = svt(q + u2, lam_lowrank / rho)
        u1 = u1 + p - a
        u2 = u2 + q - b
    return a, b


def refit_structure(weight: torch.Tensor, gram: torch.Tensor, groups: int, a: torch.Tensor, rank: int,
                    channels: int, *, iters: int = 20, ridge: float = 1e-8,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Enforce ``rank`` and ``channels`` and refit: returns ``(left (N, r), right (r, D), sparse (N, s k), index (s,))``.

    Kept channels: the ``channels`` largest ``||A_c X_c||`` (if ``A = 0``: of the rank-r residual).  Then alternately (each step an exact
    minimizer of ``||(W - L R - A_S) X||`` given the other, so the error never increases):
    ``L R = U_r U_r^T (W - A)`` with ``U_r`` the top eigenvectors of ``(W - A) G (W - A)^T``, and
    ``A_S = (W - L R) G[:, S] G[S, S]^-1``.
    """
    n, d = weight.shape
    k = d // groups
    score = _group_response_norms(a, gram, groups)
    if not bool((score > 0).any()):      # no ADMM support (e.g. admm_iters=0): where rank r leaves the most error
        _, vecs = torch.linalg.eigh(weight @ gram @ weight.T)
        u = vecs[:, -rank:]
        score = _group_response_norms(weight - u @ (u.T @ weight), gram, groups)
    index = torch.argsort(score, descending=True, stable=True)[:channels].sort().values
    cols = (index[:, None] * k + torch.arange(k, device=index.device)).reshape(-1)
    sparse = a[:, cols].clone()
    g_ss = gram[cols][:, cols]
    if channels:
        g_ss = g_ss + ridge * g_ss.diagonal().mean().clamp_min(1e-300) * torch.eye(len(cols), dtype=gram.dtype,
                                                                                   device=gram.device)
    def lowrank_step(sparse):
        rest = weight.clone()
        rest[:, cols] -= sparse
        _, vecs = torch.linalg.eigh(rest @ gram @ rest.T)
        u = vecs[:, -rank:].flip(-1)
        return u, u.T @ rest

    left, right = lowrank_step(sparse)
    if channels:
        for _ in range(iters):
            resid = weight - left @ right
            sparse = torch.linalg.solve(g_ss, (resid @ gram[:, cols]).T).T
            left, right = lowrank_step(sparse)
    return left, right, sparse, index


def input_gram(xs: Sequence[torch.Tensor], spec: ConvSpec, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, mu)``: second moment (or covariance, ``center``) of the layer's im2col patches, and their mean."""
    d = spec.in_channels * spec.kernel_volume
    total = torch.zeros(d, d, dtype=torch.float64)
    sums = torch.zeros(d, dtype=torch.float64)
    count = 0
    for x in xs:
        for chunk in x.split(8 if x.dim() > 2 else 65536):
            p = patches(chunk.double(), spec)[:, 0]
            total += p.T @ p
            sums += p.sum(0)
            count += p.shape[0]
    mu = sums / count
    gram = total / count
    if center:
        gram = gram - torch.outer(mu, mu)
    return gram, mu


# ---------------------------------------------------------------------------- the module
class LowRankSparseConv(nn.Module):
    """``y = lowrank(x) + sparse(x[:, index])``; ``lowrank`` = kxk C->r then 1x1 r->N (+bias)."""

    def __init__(self, spec: ConvSpec, rank: int, channels: int, *, dtype=None, device=None):
        super().__init__()
        self.linear = spec.is_linear
        axes = range(spec.dim)
        self.lowrank = nn.Sequential(
            make_conv(spec, spec.in_channels, rank, axes=axes, dtype=dtype, device=device),
            make_conv(spec, rank, spec.out_channels, bias=spec.bias, dtype=dtype, device=device))
        self.register_buffer("index", torch.arange(channels, device=device, dtype=torch.long))
        self.sparse = (make_conv(spec, channels, spec.out_channels, axes=axes, dtype=dtype, device=device)
                       if channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lowrank(x)
        if self.sparse is not None:
            y = y + self.sparse(x.index_select(-1 if self.linear else 1, self.index))
        return y


@dataclass(frozen=True)
class LowRankSparse(Method):
    """Low rank + channel-sparse; ranks ``(rank, channels)``.  Options: ``sparse_fraction`` (share of a
    ``macs_ratio`` budget, and of the input channels for an int ``rank``, given to the sparse branch),
    ``lam_sparse`` / ``lam_lowrank`` (the penalties, relative to ``||W X||_2``), ``admm_iters``,
    ``refit_iters`` and ``ridge`` (see :func:`admm_lowrank_sparse`, :func:`refit_structure`)."""

    sparse_fraction: float = 0.25
    lam_sparse: float = 0.05
    lam_lowrank: float = 0.05
    admm_iters: int = 300
    refit_iters: int = 20
    ridge: float = 1e-8

    name = "lowrank_sparse"
    n_ranks = 2
    rank_names = ("rank", "channels")
    supports_linear = True
    supported_dims = (1, 2, 3)
    uses_calibration = True          # factorize(calibration=X) fits the responses itself (the ADMM metric)
    factor_names = ("first", "second", "sparse", "index")

    def __post_init__(self):
        if isinstance(self.sparse_fraction, bool) or not 0 <= float(self.sparse_fraction) < 1:
            raise ValueError(f"lowrank_sparse: sparse_fraction must be in [0, 1), got {self.sparse_fraction}")

    def check(self, spec: ConvSpec) -> None:
        if spec.groups != 1:
            raise UnsupportedLayer(f"lowrank_sparse: groups={spec.groups} is not supported")
        super().check(spec)

    # -- rank arithmetic
    def full_rank(self, spec: ConvSpec) -> Ranks:
        return (min(spec.out_channels, spec.in_channels * spec.kernel_volume), 0)

    def max_rank(self, spec: ConvSpec) -> Ranks:
        return (self.full_rank(spec)[0], spec.in_channels)

    def _default_channels(self, spec: ConvSpec) -> int:
        fraction = self.sparse_fraction
        return min(spec.in_channels, max(1, round(fraction * spec.in_channels))) if fraction > 0 else 0

    def expand_rank(self, spec: ConvSpec, rank) -> Ranks:
        if isinstance(rank, int) and not isinstance(rank, bool):
            return (rank, self._default_channels(spec))
        return super().expand_rank(spec, rank)

    def validate_ranks(self, spec: ConvSpec, ranks: Ranks) -> Ranks:
        (r, s), (rmax, smax) = ranks, self.max_rank(spec)
        if not 1 <= r <= rmax:
            raise ValueError(f"lowrank_sparse: rank={r} is out of range [1, {rmax}]")
        if not 0 <= s <= smax:
            raise ValueError(f"lowrank_sparse: channels={s} is out of range [0, {smax}]")
        return (int(r), int(s))

    def scaled_ranks(self, spec: ConvSpec, t: float) -> Ranks:
        return (max(1, min(self.full_rank(spec)[0], math.ceil(t * self.full_rank(spec)[0]))),
                min(spec.in_channels, math.floor(t * self.sparse_fraction * spec.in_channels)))

    def resolve_ranks(self, spec, weight=None, *, rank=None, macs_ratio=None, energy=None, input_size=None) -> Ranks:
        """As :meth:`Method.resolve_ranks`; an ``energy`` target sets the rank, ``sparse_fraction``
        the channels."""
        check_target(rank, macs_ratio, energy)
        if energy is not None:
            r = super().resolve_ranks(spec, weight, energy=energy)[0]
            return (r, self._default_channels(spec))
        return super().resolve_ranks(spec, weight, rank=rank, macs_ratio=macs_ratio, input_size=input_size)

    def ranks_for_macs(self, spec: ConvSpec, ratio: float, input_size: Sequence[int] | None = None) -> Ranks:
        """``sparse_fraction`` of the budget to the sparse branch (fewer channels when the rest cannot
        fit rank 1), then the largest rank that fits."""
        size = default_input_size(spec) if input_size is None else tuple(input_size)
        budget = ratio * spec.dense_macs(size)
        s = min(spec.in_channels, math.floor(self.sparse_fraction * ratio * spec.in_channels))
        while s >= 0:
            best, lo, hi = None, 1, self.full_rank(spec)[0]
            while lo <= hi:
                mid = (lo + hi) // 2
                if self.cost(spec, (mid, s), size).macs <= budget + 1e-9:
                    best, lo = (mid, s), mid + 1
                else:
                    hi = mid - 1
            if best is not None:
                return best
            s -= 1
        raise ValueError(f"lowrank_sparse: macs_ratio={ratio} is unreachable for this layer")

    def spectra(self, weight: torch.Tensor, spec: ConvSpec) -> list[torch.Tensor]:
        return [torch.linalg.svdvals(weight.reshape(1, spec.out_channels, -1))]

    # -- the four pieces
    def factorize(self, weight: torch.Tensor, spec: ConvSpec, ranks: Ranks, *, calibration=None) -> dict:
        """``weight: (N, C, *k)`` float64 -> ``first (r, C, *k)``, ``second (N, r)``, ``sparse (N, s, *k)``,
        ``index (s,)`` and, with calibration and a bias, ``bias_shift (N,)`` (added to the bias)."""
        r, s = self.validate_ranks(spec, tuple(ranks))
        n, c, kv = spec.out_channels, spec.in_channels, spec.kernel_volume
        w = weight.reshape(n, c * kv).double()
        if calibration is None:
            gram, mu = torch.eye(c * kv, dtype=w.dtype, device=w.device), None
        else:
            gram, mu = input_gram(calibration, spec, center=spec.bias)
            gram = gram.to(w.device)
        scale = float(torch.linalg.matrix_norm(w @ _psd_sqrt(gram), ord=2))
        if s:
            a, _ = admm_lowrank_sparse(w, gram, c, self.lam_sparse * scale, self.lam_lowrank * scale,
                                       iters=self.admm_iters)
        else:
            a = torch.zeros_like(w)
        left, right, sparse, index = refit_structure(w, gram, c, a, r, s, iters=self.refit_iters, ridge=self.ridge)
        factors = {"first": right.reshape(r, c, *spec.kernel_size), "second": left,
                   "sparse": sparse.reshape(n, s, *spec.kernel_size), "index": index}
        if mu is not None and spec.bias:          # the bias absorbs the mean response error (Zhang et al.)
            cols = (index[:, None] * kv + torch.arange(kv)).reshape(-1)
            approx = left @ right
            approx[:, cols] += sparse
            factors["bias_shift"] = (w - approx) @ mu.to(w.device)
        return factors

    def reconstruct(self, factors: dict, spec: ConvSpec) -> torch.Tensor:
        n, c, kv = spec.out_channels, spec.in_channels, spec.kernel_volume
        w = factors["second"] @ factors["first"].reshape(factors["first"].shape[0], -1)
        w = w.reshape(n, c, kv).clone()
        w[:, factors["index"]] += factors["sparse"].reshape(n, -1, kv)
        return w.reshape(n, c, *spec.kernel_size)

    def factors_of(self, module: Factorized) -> dict:
        block = module[0]
        first, second = (conv_of(p) for p in block.lowrank)
        sparse = conv_of(block.sparse).weight.detach().double() if block.sparse is not None else \
            first.weight.new_zeros(second.weight.shape[0], 0, *first.weight.shape[2:]).double()
        return {"first": first.weight.detach().double(), "second": second.weight.detach().double().reshape(
            second.weight.shape[0], -1), "sparse": sparse, "index": block.index.clone()}

    def build(self, spec: ConvSpec, ranks: Ranks, factors=None, *, dtype=None, device=None) -> Factorized:
        r, s = self.validate_ranks(spec, tuple(ranks))
        block = LowRankSparseConv(spec, r, s, dtype=dtype, device=device)
        if factors is not None:
            first, second = block.lowrank
            bias = factors.get("bias")
            if bias is not None and factors.get("bias_shift") is not None:
                bias = bias.double() + factors["bias_shift"].to(bias.device)
            copy_into(first, factors["first"])
            copy_into(second, factors["second"], bias)
            if s:
                copy_into(block.sparse, factors["sparse"])
                block.index.copy_(factors["index"].to(block.index.device))
        return self.factorized(spec, (r, s), block)

    def cost(self, spec: ConvSpec, ranks: Ranks, input_size: Sequence[int] = ()) -> Cost:
        r, s = ranks
        out = math.prod(spec.output_size(input_size))
        ck = spec.in_channels * spec.kernel_volume
        params = r * ck + spec.out_channels * r + spec.out_channels * s * spec.kernel_volume
        return Cost(params=params + (spec.out_channels if spec.bias else 0), macs=out * params)

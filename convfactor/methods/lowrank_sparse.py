"""Low-rank + sparse: the lecture's unified framework (Yu, Liu, Wang, Tao, "On Compressing Deep Models by
Low Rank and Sparse Decomposition", CVPR 2017, sec. 3), with column-sparse A and low-rank B::

    min_{A, B}  1/2 ||Y - (A + B) X||^2  +  lam_sparse ||A||_{2,1}  +  lam_lowrank ||B||_*

``W: (N, C k)`` is the layer's matrix, ``X: (C k, P)`` im2col patches of its inputs and ``Y = W X``;
``||A||_{2,1}`` sums the Frobenius norms of A's *input-channel groups* (the k columns of one input
channel), so a zero group is an input channel the sparse branch never reads.  Without calibration
``X X^T = I`` (weight approximation).  Only ``G = X X^T / P`` is needed (``Y X^T = W G``).

Solver: ADMM (Boyd et al. 2011, sec. 3.1) on the split ``P = A, Q = B``: a closed-form
quadratic (P, Q)-step with one precomputed ``(2G + rho I)^-1`` (element-wise when ``G = I``, the
weight-only case), then the two proximal steps in closed form, group (column) shrinkage for
``||.||_{2,1}`` and singular value thresholding (Cai, Candes, Shen 2010) for ``||.||_*``, the latter
through the smaller Gram matrix (:func:`.linalg.shrink_singular_values`: one ``eigh`` instead of
an SVD per iteration), over-relaxed with residual balancing (sec. 3.4).  It stops after
``admm_iters`` iterations or once the primal and dual residuals are below ``admm_tol`` relative
(sec. 3.3.1).  The target ranks are then enforced (the ``channels`` groups with the largest
response ``||A_c X_c||`` and the top-``rank`` part of B) and the fixed
structure is refitted by alternating exact minimizations (B: a response-weighted truncated SVD,
Zhang et al. 2016 sec. 3.1; A: least squares on the kept channels), which never increases the error.

Deployed (:class:`LowRankSparseConv`) as the sum of a low-rank branch (channel-SVD chain kxk C->r,
1x1 r->N carrying the bias) and a sparse branch (``index_select`` of the kept input channels, then
a kxk conv channels->N), both with every conv option of the original.  Ranks: ``(rank, channels)``,
``channels = 0`` meaning no sparse branch (so the full rank ``(min(N, C k), 0)`` is exact).
Options: ``lam_sparse``, ``lam_lowrank`` (relative to the largest singular value of ``W G^1/2``,
default 0.05 each), ``admm_iters`` (300), ``admm_tol`` (1e-4), ``refit_iters`` (20),
``sparse_fraction`` (share of a ``macs_ratio`` budget given to the sparse branch, default 0.25),
``ridge`` (1e-8), ``precision`` (``"float64"``, or ``"float32"`` for the ADMM iterations; the
structure refit stays float64).  A long ADMM shows a per-iteration progress bar on a terminal.

Cost (weight-only): a 512 x 512 x 3 x 3 kernel costs one 512 x 512 ``eigh`` and two 512 x 512 x
4608 products per ADMM iteration, and stops once the kept channels settle (20 iterations for a
Gaussian kernel at ``macs_ratio=0.5``): 5 s for the whole factorization, one thread.  The earlier
solver (dense 4608 x 4608 (P, Q)-step, LAPACK SVD per iteration, a 4608 x 4608 ``eigh`` for the
scale, always 300 iterations) needed ~590 s for that layer on the same machine (extrapolated
from 5 iterations), with the same kept channels.  All of ResNet-50 at ``macs_ratio=0.5``: 56 s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..spec.convspec import ConvSpec, UnsupportedLayer, conv_of, make_conv
from ..spec.im2col import patches
from .base import Cost, Factorized, Method, Ranks, check_target, copy_into, default_input_size
from .linalg import PRECISIONS, gram_flops, iteration_progress, shrink_singular_values, svd_flops, truncated_factors

__all__ = ["LowRankSparse", "LowRankSparseConv", "admm_lowrank_sparse", "refit_structure", "group_shrink", "svt",
           "input_gram"]


# ---------------------------------------------------------------------------- proximal operators
def svt(m: torch.Tensor, tau: float) -> torch.Tensor:
    """Singular value thresholding: ``argmin_B 1/2 ||B - m||^2 + tau ||B||_*`` (via the smaller Gram matrix)."""
    return shrink_singular_values(m, tau)


def group_shrink(m: torch.Tensor, groups: int, tau: float) -> torch.Tensor:
    """``argmin_A 1/2 ||A - m||^2 + tau sum_c ||A_c||``, ``A_c`` the c-th of ``groups`` equal column blocks."""
    n, cols = m.shape
    blocks = m.reshape(n, groups, cols // groups)
    norms = torch.linalg.vector_norm(blocks, dim=(0, 2), keepdim=True)
    scale = (1 - tau / norms.clamp_min(torch.finfo(m.dtype).tiny)).clamp(min=0)
    return (blocks * scale).reshape(n, cols)


def _response_norm(w: torch.Tensor, gram: torch.Tensor | None) -> float:
    """``||W G^1/2||_2 = sqrt(lambda_max(W G W^T))`` (``gram`` None: ``||W||_2``, from the smaller Gram)."""
    if gram is None:
        m = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    else:
        m = w @ gram @ w.T
    return float(torch.linalg.eigvalsh(m)[-1].clamp_min(0).sqrt())


def _group_response_norms(a: torch.Tensor, gram: torch.Tensor | None, groups: int) -> torch.Tensor:
    """``||A_c X_c||`` per channel group c: ``sqrt(tr(A_c G_cc A_c^T))`` (``gram`` None: ``G = I``)."""
    n, cols = a.shape
    k = cols // groups
    blocks = a.reshape(n, groups, k)
    if gram is None:
        return blocks.pow(2).sum((0, 2)).sqrt()
    g = gram.reshape(groups, k, groups, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)   # (groups, k, k)
    return torch.einsum("ngk,gkl,ngl->g", blocks, g, blocks).clamp(min=0).sqrt()


def _is_identity(gram: torch.Tensor | None) -> bool:
    """Whether ``gram`` is None or exactly the identity (checked without allocating one)."""
    if gram is None:
        return True
    d = gram.shape[0]
    return bool((gram.diagonal() == 1).all()) and int(torch.count_nonzero(gram)) == d


def _pq_step(weight: torch.Tensor, gram: torch.Tensor | None, rho: float):
    """The (P, Q)-step's linear solve ``S = (2WG + rho M)(2G + rho I)^-1`` as a function of ``M`` (a
    temporary it overwrites); element-wise for ``G = I`` (None)."""
    if gram is None:
        w2 = 2 * weight
        return lambda m: m.mul_(rho).add_(w2).div_(2 + rho)
    eye = torch.eye(gram.shape[0], dtype=weight.dtype, device=weight.device)
    inv = torch.linalg.inv(2 * gram + rho * eye)
    wg2 = 2 * weight @ gram
    return lambda m: m.mul_(rho).add_(wg2) @ inv


def _norm(*ms: torch.Tensor) -> float:
    return math.sqrt(sum(float(torch.linalg.vector_norm(m)) ** 2 for m in ms))


class _ADMMState:
    """The iterates of :func:`admm_lowrank_sparse` in scaled form: ``A, B`` and the scaled duals ``U1, U2``."""

    def __init__(self, weight, gram, groups: int, lams: tuple[float, float], rho: float):
        self.weight, self.gram, self.groups, self.lams = weight, gram, groups, lams
        self.set_rho(rho)
        self.a, self.b, self.u1, self.u2 = (torch.zeros_like(weight) for _ in range(4))

    def set_rho(self, rho: float) -> None:
        self.rho = rho
        self.solve = _pq_step(self.weight, self.gram, rho)

    def iterate(self, relax: float, measure: bool) -> tuple[float, float, float] | None:
        """One ADMM iteration, over-relaxed by ``relax`` (Boyd et al. sec. 3.4.3).  With ``measure``:
        ``(primal, dual, ||(P, Q)||)`` residual norms.  In place where it can: on a 512 x 4608 kernel
        the element-wise passes cost as much as the SVT."""
        pa, pb = self.a - self.u1, self.b - self.u2
        s = self.solve(pa + pb).mul_(0.5)
        c = pa.sub_(pb).mul_(0.5)                       # (pa - pb) / 2
        q = torch.sub(s, c, out=pb)                     # Q = (S - (pa - pb)) / 2
        p = s.add_(c)                                   # P = (S + (pa - pb)) / 2
        if relax != 1:
            p.mul_(relax).add_(self.a, alpha=1 - relax)
            q.mul_(relax).add_(self.b, alpha=1 - relax)
        a_new = group_shrink(p + self.u1, self.groups, self.lams[0] / self.rho)
        b_new = svt(q + self.u2, self.lams[1] / self.rho)
        size = _norm(p, q) if measure else 0.0
        r1, r2 = p.sub_(a_new), q.sub_(b_new)
        norms = (_norm(r1, r2), self.rho * _norm(a_new - self.a, b_new - self.b), size) if measure else None
        self.u1.add_(r1)
        self.u2.add_(r2)
        self.a, self.b = a_new, b_new
        return norms

    def balance(self, primal: float, dual: float, mu: float = 10.0, factor: float = 2.0) -> bool:
        """Residual balancing (Boyd et al. sec. 3.4.1): scale ``rho`` by ``factor`` when one residual is
        ``mu`` times the other (the scaled duals rescale inversely).  Returns whether ``rho`` changed."""
        if primal > mu * dual:
            scale = factor
        elif dual > mu * primal:
            scale = 1 / factor
        else:
            return False
        self.set_rho(self.rho * scale)
        self.u1, self.u2 = self.u1 / scale, self.u2 / scale
        return True


#: at most this many residual-balancing changes of ``rho`` per ADMM run (Boyd et al. sec. 3.4.1)
RHO_UPDATES = 10
#: the support stop: the same top groups at this many consecutive residual checks
STABLE_CHECKS = 3


def admm_lowrank_sparse(weight: torch.Tensor, gram: torch.Tensor | None, groups: int, lam_sparse: float,
                        lam_lowrank: float, *, rho: float | None = None, iters: int = 300, tol: float = 0.0,
                        support: int = 0, relax: float = 1.6, precision: str = "float64", callback=None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM for ``min 1/2 tr((W - A - B) G (W - A - B)^T) + lam_sparse ||A||_{2,1} + lam_lowrank ||B||_*``.

    ``weight: (N, D)``, ``gram: (D, D)`` (PSD; None or the identity: weight approximation, solved
    element-wise), ``groups`` column groups of A (D divisible).  Returns ``(A, B)`` in ``weight``'s
    dtype.  (P, Q)-step: stationarity of ``1/2||(W-P-Q)X||^2 + rho/2 ||P-a||^2 + rho/2 ||Q-b||^2``
    gives ``P - Q = a - b`` and ``(P + Q)(2G + rho I) = 2WG + rho (a + b)``.

    Stops after ``iters`` iterations, or (``tol > 0``) once the primal residual ``||(P, Q) - (A, B)||``
    is below ``tol`` times the iterates' norm and the dual residual ``rho ||(A, B) - previous||``
    below ``tol`` times ``rho ||(U1, U2)||`` (Boyd et al. 2011, sec. 3.3.1, relative criteria),
    checked every 5 iterations.  With ``support = s > 0`` it also stops once the ``s`` groups with the
    largest ``||A_c X_c||`` (all nonzero) are the same (up to ``s // 32`` swaps) at
    :data:`STABLE_CHECKS` consecutive checks:
    all :meth:`LowRankSparse.factorize` takes from the ADMM is that choice of channels.
    ``relax``: over-relaxation (1 = none; sec. 3.4.3); ``rho`` is also rebalanced at the checks
    (sec. 3.4.1, at most :data:`RHO_UPDATES` times).  Relaxation 1.6 with rebalancing reached
    ``tol=1e-4`` in 37 iterations on a Gaussian 256 x 256 x 3 x 3 kernel against 103 without
    either, with the same kept channels and error.  ``precision="float32"`` runs the iterations in
    float32.  ``callback(i, iters, primal residual)`` is called after every
    iteration (besides the terminal progress bar; the residual is None between checks).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    work = torch.float32 if precision == "float32" else weight.dtype
    gram = None if _is_identity(gram) else gram.to(work)
    if rho is None:
        rho = 1.0 if gram is None else float(gram.diagonal().mean().clamp_min(1e-12))
    state = _ADMMState(weight.to(work), gram, groups, (lam_sparse, lam_lowrank), rho)
    floor = 1e-12 * _norm(weight) * max(rho, 1.0)
    updates, stable = RHO_UPDATES, _StableSupport(support, gram, groups)
    with iteration_progress(iters, f"lowrank_sparse ADMM {tuple(weight.shape)}", callback, "residual") as step:
        for i in range(1, iters + 1):
            norms = state.iterate(relax, measure=i % 5 == 0 or i == iters)
            step(i, None if norms is None else norms[0])
            if norms is None:
                continue
            primal, dual, size = norms
            if tol > 0 and primal <= tol * max(size, _norm(state.a, state.b)) + floor \
                    and dual <= tol * state.rho * _norm(state.u1, state.u2) + floor:
                break
            if stable(state.a):
                break
            if updates > 0 and state.balance(primal, dual):
                updates -= 1
    return state.a.to(weight.dtype), state.b.to(weight.dtype)


class _StableSupport:
    """``stable(A)``: whether the top-``support`` groups by ``||A_c X_c||`` (all nonzero) have been the same,
    up to ``support // 32`` swaps at the boundary, at :data:`STABLE_CHECKS` consecutive calls (never, for
    ``support = 0``)."""

    def __init__(self, support: int, gram: torch.Tensor | None, groups: int):
        self.support, self.gram, self.groups = support, gram, groups
        self.last, self.count = None, 0

    def __call__(self, a: torch.Tensor) -> bool:
        if self.support <= 0:
            return False
        scores = _group_response_norms(a, self.gram, self.groups)
        values, index = scores.topk(min(self.support, self.groups))
        top = frozenset(index.tolist()) if bool((values > 0).all()) else None
        same = top is not None and self.last is not None and len(top - self.last) <= self.support // 32
        self.count = self.count + 1 if same else 0
        self.last = top
        return self.count >= STABLE_CHECKS - 1


def refit_structure(weight: torch.Tensor, gram: torch.Tensor | None, groups: int, a: torch.Tensor, rank: int,
                    channels: int, *, iters: int = 20, ridge: float = 1e-8,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Enforce ``rank`` and ``channels`` and refit: returns ``(left (N, r), right (r, D), sparse (N, s k), index (s,))``.

    Kept channels: the ``channels`` largest ``||A_c X_c||`` (if ``A = 0``: of the rank-r residual).  Then alternately (each step an exact
    minimizer of ``||(W - L R - A_S) X||`` given the other, so the error never increases):
    ``L R = U_r U_r^T (W - A)`` with ``U_r`` the top eigenvectors of ``(W - A) G (W - A)^T``, and
    ``A_S = (W - L R) G[:, S] G[S, S]^-1``.  ``gram`` None (or the identity): ``G = I``, where the
    low-rank step is the truncated SVD (:func:`.linalg.truncated_factors`) and ``A_S`` the residual's
    columns; the alternation also stops once an iteration lowers the squared error by less than 1e-6 (relative).
    """
    gram = None if _is_identity(gram) else gram
    n, d = weight.shape
    k = d // groups
    score = _group_response_norms(a, gram, groups)
    if not bool((score > 0).any()):      # no ADMM support (e.g. admm_iters=0): where rank r leaves the most error
        left, right = _lowrank_step(weight, gram, rank)
        score = _group_response_norms(weight - left @ right, gram, groups)
    index = torch.argsort(score, descending=True, stable=True)[:channels].sort().values
    cols = (index[:, None] * k + torch.arange(k, device=index.device)).reshape(-1)
    sparse = a[:, cols].clone()
    solve_sparse = _sparse_solver(gram, cols, ridge) if channels else None

    def lowrank_step(sparse):
        rest = weight.clone()
        rest[:, cols] -= sparse
        return _lowrank_step(rest, gram, rank)

    left, right = lowrank_step(sparse)
    previous = math.inf
    for _ in range(iters if channels else 0):
        resid = weight - left @ right
        sparse = solve_sparse(resid)
        left, right = lowrank_step(sparse)
        if gram is None:
            err = float((resid[:, cols] - sparse).pow(2).sum() + resid.pow(2).sum() - resid[:, cols].pow(2).sum())
            if previous < math.inf and previous - err <= 1e-6 * previous:
                break
            previous = err
    return left, right, sparse, index


def _lowrank_step(rest: torch.Tensor, gram: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)`` with ``left @ right = U_r U_r^T rest``, ``U_r`` the top eigenvectors of ``rest G rest^T``."""
    if gram is None:
        return truncated_factors(rest, min(rank, *rest.shape))
    _, vecs = torch.linalg.eigh(rest @ gram @ rest.T)
    u = vecs[:, -rank:].flip(-1)
    return u, u.T @ rest


def _sparse_solver(gram: torch.Tensor | None, cols: torch.Tensor, ridge: float):
    """``resid -> resid G[:, S] (G[S, S] + ridge)^-1``, the least-squares sparse block for fixed ``L R``."""
    if gram is None:
        return lambda resid: resid[:, cols] / (1 + ridge)
    g_ss = gram[cols][:, cols]
    g_ss = g_ss + ridge * g_ss.diagonal().mean().clamp_min(1e-300) * torch.eye(len(cols), dtype=gram.dtype,
                                                                               device=gram.device)
    g_cols = gram[:, cols]
    return lambda resid: torch.linalg.solve(g_ss, (resid @ g_cols).T).T


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
    ``admm_tol`` (relative residuals at which the ADMM stops early; 0: never), ``precision``
    (``"float64"`` or ``"float32"`` ADMM iterations), ``refit_iters`` and ``ridge`` (see
    :func:`admm_lowrank_sparse`, :func:`refit_structure`)."""

    sparse_fraction: float = 0.25
    lam_sparse: float = 0.05
    lam_lowrank: float = 0.05
    admm_iters: int = 300
    refit_iters: int = 20
    ridge: float = 1e-8
    admm_tol: float = 1e-4
    precision: str = "float64"

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
        if isinstance(self.admm_tol, bool) or not isinstance(self.admm_tol, (int, float)) or not self.admm_tol >= 0:
            raise ValueError(f"lowrank_sparse: admm_tol must be a number >= 0, got {self.admm_tol!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"lowrank_sparse: precision must be one of {PRECISIONS}, got {self.precision!r}")

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

    def factorization_cost(self, spec: ConvSpec, ranks: Ranks) -> float:
        """One SVD-sized step on the ``(N, C k)`` matrix per ADMM and refit iteration (an ``eigh`` of the
        smaller Gram matrix and two products, :func:`.linalg.shrink_singular_values`), counting all
        ``admm_iters`` (the ADMM may stop early); without sparse channels, one Gram-route truncation."""
        n, ck = spec.out_channels, spec.in_channels * spec.kernel_volume
        if ranks[-1] == 0:
            return gram_flops(n, ck)
        return max(1, self.admm_iters + self.refit_iters) * svd_flops(n, ck)

    # -- the four pieces
    def factorize(self, weight: torch.Tensor, spec: ConvSpec, ranks: Ranks, *, calibration=None) -> dict:
        """``weight: (N, C, *k)`` float64 -> ``first (r, C, *k)``, ``second (N, r)``, ``sparse (N, s, *k)``,
        ``index (s,)`` and, with calibration and a bias, ``bias_shift (N,)`` (added to the bias)."""
        r, s = self.validate_ranks(spec, tuple(ranks))
        n, c, kv = spec.out_channels, spec.in_channels, spec.kernel_volume
        w = weight.reshape(n, c * kv).double()
        gram, mu = None, None             # None: G = I, weight approximation
        if calibration is not None:
            gram, mu = input_gram(calibration, spec, center=spec.bias)
            gram = gram.to(w.device)
        scale = _response_norm(w, gram)
        if s:
            a, _ = admm_lowrank_sparse(w, gram, c, self.lam_sparse * scale, self.lam_lowrank * scale,
                                       iters=self.admm_iters, tol=self.admm_tol, support=s, precision=self.precision)
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

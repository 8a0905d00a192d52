"""CP decomposition of conv kernels (Lebedev et al., "Speeding-up Convolutional Neural Networks
Using Fine-tuned CP-Decomposition", ICLR 2015: the rank-R kernel approximation and its
four-conv pipeline).

Per group, the kernel ``W: (N, C, k_0, ..., k_{d-1})`` is approximated by ``R`` rank-1 terms

    W[n, c, i, j] ~ sum_r a[n, r] b[c, r] h[i, r] w[j, r]

and run as a chain of ordinary convs:

* ``1x1`` conv ``C -> R`` (factor ``b``),
* one depthwise 1-D conv per spatial axis (``k_0 x 1`` then ``1 x k_1``; factors ``h``, ``w``),
  each carrying that axis' stride, dilation and padding (``form="separable"``, the default), or
  a single depthwise ``k_0 x k_1`` conv holding the per-channel outer product ``h_r w_r^T``
  (``form="folded"``, which can be faster on CPU),
* ``1x1`` conv ``R -> N`` (factor ``a``) carrying the bias.

Grouped convs factorize each group separately (rank ``R`` per group) and use grouped 1x1 convs.
Conv1d (a 3-way tensor, one depthwise conv) and Conv3d (5-way, three depthwise convs) work the same.
A 1x1 kernel is a matrix, for which the truncated SVD is the optimal CP; it is used directly.

The fit is a hand-written, torch-native ALS (Kolda & Bader, "Tensor Decompositions and
Applications", SIAM Review 2009, sec. 3.4) in float64, because TensorLy's ``parafac`` is 25x+
slower on these shapes (see the ``cp_peers`` bench section), and because an ``init='svd'`` that
takes a full-matrices SVD of a wide unfolding (as TensorLy's could; the installed 0.10 passes
``full_matrices=False``) would allocate a 65536 x 65536 ``V`` -- tens of GB -- for the spatial
modes of a 256x256x3x3 kernel.  What makes it fast and memory-safe:

* the MTTKRPs share work through a small dimension tree: ``X = T x_c B`` (one GEMM, ``N*C*K*R``
  MACs, ``K = prod(k)``) serves both the ``a`` update and, contracted with the new ``a``, every
  spatial update; ``Y = T x_n A`` serves the ``b`` update.  Two GEMMs per sweep; the only
  Khatri-Rao product ever formed is the spatial one, ``(K, R)``;
* the normal equations use the Hadamard product of the factor Grams (Kolda & Bader sec. 3.4),
  ``R x R``, solved by Cholesky with proximal damping: each update minimizes
  ``||T - [[...]]||^2 + lam ||U - U_old||^2``, so the system is always positive definite and the
  fit error can never increase from one sweep to the next;
* initialization (``init="svd"``): the leading left singular vectors of every unfolding, obtained
  from the small ``d_m x d_m`` Gram matrix (never an SVD of the wide unfolding), with seeded
  Gaussian columns where ``R > d_m``; ``init="slices"``: the truncated SVD of every spatial slice
  ``W[:, :, i, j]`` (spatial factors one-hot), exact at the full rank;
* a line search (Bro's extrapolation, PhD thesis 1998; as in TensorLy's ``linesearch=True``):
  after each sweep the step is extrapolated by ``it**(1/p)`` and kept only if the error drops;
  a kept point's ``X`` is reused by the next sweep.  It roughly halves the sweeps needed for a
  given error;
* on large problems the two GEMMs run in float32 while the error is above 1e-3 (see
  :func:`cp_als`, ``precision``);
* the error is tracked every sweep from Grams and the last MTTKRP (no reconstruction), and the
  iterations stop after ``n_iter`` (default 50) sweeps or when its relative change drops below
  ``tol``.

Measured while developing (1 thread, CPU time on a loaded machine; the ``cp_peers`` bench section
has the side-by-side figures): a Gaussian 256x256x3x3 kernel, rank 256: 1.2 s, error 0.769,
against TensorLy ``parafac`` (100 iterations, float32) 67 s, error 0.774; rank 64: 0.3 s vs 16 s.
On a planted rank-256 kernel + 5% noise, 50 sweeps give 0.0492 against TensorLy's 0.0491, and
``n_iter=100`` (2 s) gives 0.0452.  All 53 ResNet-50 kernels at macs_ratio=0.5: 77 s (41 s with
``n_iter=25``), dominated by the three 512x512x3x3 layers at rank 1145.
A Gauss-Newton / LM refinement (what Lebedev et al. used) is not implemented.

``full_rank`` is a rank at which an exact CP is known by construction: one rank-1 term per index
of all modes but the longest, ``prod(dims) / max(dims)`` per group (``min(N, C) * kh * kw`` for
usual kernels); at that rank and above :func:`exact_cp` returns that construction instead of
running ALS.  ``energy`` targets are not defined for CP (there is no spectrum to truncate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..spec.convspec import ConvSpec, conv_of, make_conv
from .base import Cost, Factorized, Method, Ranks, copy_into
from .linalg import iteration_progress, svd_flops, truncated_svd, truncated_svd_flops

#: ``precision=`` choices of :func:`cp_als`
PRECISIONS = ("auto", "float64")

__all__ = ["CP", "cp_als", "exact_cp", "cp_reconstruct", "CPResult"]

FORMS = ("separable", "folded")
INITS = ("svd", "slices", "random")


class CPResult:
    """Factors ``[(B, d_m, R) per mode]`` and the relative error after each ALS sweep."""

    def __init__(self, factors: list[torch.Tensor], errors: list[float], n_iter: int, converged: bool):
        self.factors = factors
        self.errors = errors
        self.n_iter = n_iter
        self.converged = converged

    def __repr__(self) -> str:
        err = self.errors[-1] if self.errors else float("nan")
        return f"CPResult(rank={self.factors[0].shape[-1]}, n_iter={self.n_iter}, error={err:.3g})"


# ---------------------------------------------------------------------------------- tensor math
def cp_reconstruct(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``factors: [(B, d_m, R)]`` -> ``(B, d_0, ..., d_{M-1})``, the sum of R rank-1 terms."""
    first, rest = factors[0], factors[1:]
    b, _, r = first.shape
    kr = torch.ones(b, 1, r, dtype=first.dtype, device=first.device)
    for f in rest:
        kr = (kr.unsqueeze(2) * f.unsqueeze(1)).reshape(b, -1, r)
    return (first @ kr.transpose(1, 2)).reshape(b, *(f.shape[1] for f in factors))


def full_cp_rank(dims: Sequence[int]) -> int:
    """Rank of the exact construction in :func:`exact_cp`: ``prod(dims) / max(dims)``."""
    return math.prod(dims) // max(dims)


def exact_cp(tensor: torch.Tensor, rank: int | None = None) -> list[torch.Tensor]:
    """An exact CP of ``tensor: (B, d_0, ..., d_{M-1})`` with ``prod(d) / max(d)`` terms.

    The longest mode ``m`` carries the fibres ``T[..., :, ...]``; every other mode a one-hot vector
    picking the fibre's index.  ``rank`` larger than that pads with zero terms.
    """
    b, dims = tensor.shape[0], tensor.shape[1:]
    m = max(range(len(dims)), key=lambda i: dims[i])
    r0 = full_cp_rank(dims)
    rank = r0 if rank is None else int(rank)
    if rank < r0:
        raise ValueError(f"exact_cp needs rank >= {r0}, got {rank}")
    others = [i for i in range(len(dims)) if i != m]
    # fibres: (B, d_m, r0), terms ordered row-major over the other modes
    fibres = tensor.movedim(m + 1, -1).reshape(b, r0, dims[m]).transpose(1, 2)
    idx = torch.arange(r0, device=tensor.device)
    factors: list[torch.Tensor] = [None] * len(dims)  # type: ignore[list-item]
    stride = r0
    for i in others:
        stride //= dims[i]
        onehot = torch.zeros(dims[i], rank, dtype=tensor.dtype, device=tensor.device)
        onehot[(idx // stride) % dims[i], idx] = 1
        factors[i] = onehot.expand(b, -1, -1).clone()
    factors[m] = torch.cat([fibres, fibres.new_zeros(b, dims[m], rank - r0)], dim=2)
    return _balance(factors)


def _balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Give every term's column the same norm in every mode (the model is unchanged)."""
    norms = torch.stack([f.norm(dim=1) for f in factors])          # (M, B, R)
    geo = norms.clamp_min(1e-300).log().mean(0).exp()
    ok = (norms > 0).all(0)                                         # terms with no zero column
    scale = torch.where(ok, geo / norms.clamp_min(1e-300), torch.ones_like(norms))
    return [f * s.unsqueeze(1) for f, s in zip(factors, scale)]


def _unfold_gram(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """``T_(m) T_(m)^T``, ``(B, d_m, d_m)``, without forming a wide SVD."""
    t = tensor.movedim(mode + 1, 1).reshape(tensor.shape[0], tensor.shape[mode + 1], -1)
    return t @ t.transpose(1, 2)


def _init(tensor: torch.Tensor, rank: int, init: str, generator: torch.Generator) -> list[torch.Tensor]:
    b, dims = tensor.shape[0], tensor.shape[1:]
    opts = dict(dtype=tensor.dtype, device=tensor.device)
    if init == "slices" and len(dims) > 2:
        return _slices_init(tensor, rank, generator)
    factors = []
    for mode, d in enumerate(dims):
        if init == "random":
            f = torch.randn(b, d, rank, generator=generator, dtype=tensor.dtype).to(tensor.device) / math.sqrt(d)
        else:
            _, vecs = torch.linalg.eigh(_unfold_gram(tensor, mode))     # ascending
            k = min(rank, d)
            f = vecs.flip(-1)[..., :k]
            if rank > d:
                extra = torch.randn(b, d, rank - d, generator=generator, dtype=tensor.dtype).to(**opts)
                f = torch.cat([f, extra / math.sqrt(d)], dim=2)
        factors.append(f)
    return factors


def _slices_init(tensor: torch.Tensor, rank: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Top ``rank`` singular triplets over all spatial slices ``T[:, :, k]`` (one-hot spatial factors)."""
    b, n, c = tensor.shape[:3]
    sdims = tensor.shape[3:]
    k = math.prod(sdims)
    slices = tensor.reshape(b, n, c, k).permute(0, 3, 1, 2)                # (B, K, N, C)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)               # (B,K,N,p) (B,K,p) (B,K,p,C)
    p = s.shape[-1]
    flat = s.reshape(b, k * p)
    take = min(rank, k * p)
    order = flat.argsort(dim=1, descending=True)[:, :take]                 # (B, take)
    kk, pp = order // p, order % p
    bi = torch.arange(b, device=tensor.device).unsqueeze(1)
    root = flat.gather(1, order).sqrt()
    a = u[bi, kk, :, pp].transpose(1, 2) * root.unsqueeze(1)               # (B, N, take)
    bb = vh[bi, kk, pp, :].transpose(1, 2) * root.unsqueeze(1)             # (B, C, take)
    spatial = []
    stride = k
    for d in sdims:
        stride //= d
        onehot = torch.zeros(b, d, take, dtype=tensor.dtype, device=tensor.device)
        onehot.scatter_(1, ((kk // stride) % d).unsqueeze(1), 1.0)
        spatial.append(onehot)
    factors = [a, bb, *spatial]
    if take < rank:
        factors = [torch.cat([f, torch.randn(b, f.shape[1], rank - take, generator=generator,
                                             dtype=f.dtype).to(f.device) / math.sqrt(f.shape[1])], 2)
                   for f in factors]
    return factors


def _spatial_mttkrp(q: torch.Tensor, spatial: list[torch.Tensor], axis: int) -> torch.Tensor:
    """Contract ``q: (B, k_0, ..., k_{d-1}, R)`` with every spatial factor except ``axis``."""
    t = q
    for ax in reversed(range(len(spatial))):
        if ax == axis:
            continue
        f = spatial[ax]                                                     # (B, k, R)
        shape = [f.shape[0]] + [1] * len(spatial) + [f.shape[2]]
        shape[ax + 1] = f.shape[1]
        t = (t * f.reshape(shape)).sum(ax + 1, keepdim=True)
    return t.reshape(q.shape[0], q.shape[axis + 1], q.shape[-1])           # (B, k_axis, R)


def _khatri_rao(spatial: list[torch.Tensor], b: int, r: int, like: torch.Tensor) -> torch.Tensor:
    kr = torch.ones(b, 1, r, dtype=like.dtype, device=like.device)
    for f in spatial:
        kr = (kr.unsqueeze(2) * f.unsqueeze(1)).reshape(b, -1, r)
    return kr                                                               # (B, K, R)


def cp_als(tensor: torch.Tensor, rank: int, *, n_iter: int = 50, tol: float = 1e-6, init: str = "svd",
           damping: float = 1e-7, seed: int = 0, precision: str = "auto", linesearch: bool = True,
           factors: Sequence[torch.Tensor] | None = None, callback=None) -> CPResult:
    """Rank-``rank`` CP of a batch of tensors by damped ALS.

    ``tensor: (B, N, C, k_0, ..., k_{d-1})`` (``d >= 0``; a leading batch axis, e.g. conv groups)
    -> :class:`CPResult` with ``factors = [A (B, N, R), B (B, C, R), H_0 (B, k_0, R), ...]`` and
    ``errors[i]``, the relative Frobenius error ``||T - [[...]]|| / ||T||`` (over the whole
    batch) after sweep ``i``, which never increases (exactly, in float64; within round-off in
    the float32 phase below).  Stops after ``n_iter`` sweeps or when the error's relative change
    is below ``tol``.  ``damping`` scales the proximal term (``lam = damping * mean(diag(Gram))``).
    Computed in float64 (returned in float64), except that with ``precision="auto"`` the two big
    MTTKRP GEMMs and the two channel-mode Grams of a large problem (``N*C*K*R >= 2**22``) run in
    float32 while the error is above ``1e-3``: their relative round-off (~1e-6) is far below the
    fit error there, and they are 2-3x faster; later sweeps, the normal equations and the error
    tracking are float64.  ``precision="float64"`` keeps everything in float64.  (A float32-only
    mode is not offered: with float32 MTTKRPs the error stalls and jitters around 1e-4, so "auto"
    already takes all the speed float32 can give.)

    A long fit shows a per-sweep progress bar on a terminal (:func:`.linalg.iteration_progress`);
    ``callback(sweep, n_iter, error)`` is called after every sweep.
    """
    if tensor.dim() < 3:
        raise ValueError(f"cp_als needs a (B, N, C, ...) tensor, got shape {tuple(tensor.shape)}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not (n_iter >= 0 and tol >= 0 and damping > 0):
        raise ValueError("need n_iter >= 0, tol >= 0 and damping > 0")
    t = tensor.detach().to(torch.float64)
    b, n, c = t.shape[:3]
    sdims = tuple(t.shape[3:])
    k = math.prod(sdims)
    m_modes = 2 + len(sdims)
    norm2 = t.pow(2).sum(dim=tuple(range(1, t.dim())))                     # (B,)
    total2 = float(norm2.sum())
    if total2 == 0:
        zeros = [t.new_zeros(b, d, rank) for d in t.shape[1:]]
        return CPResult(zeros, [0.0], 0, True)
    gen = torch.Generator().manual_seed(int(seed))
    if factors is not None:
        fs = [f.detach().to(torch.float64).clone() for f in factors]
        if len(fs) != m_modes or any(f.shape != (b, d, rank) for f, d in zip(fs, t.shape[1:])):
            raise ValueError("factors= must be [(B, d_m, rank)] for every mode")
    else:
        fs = _init(t, rank, init, gen)
    a, bf, spatial = fs[0], fs[1], list(fs[2:])
    # Round-off floor for the damping: a factor column's scale is ~ ||T||^(1/M).
    scale2 = (norm2.clamp_min(1e-300) / rank) ** ((m_modes - 1) / m_modes)
    floor = 1e-12 * scale2
    t_nkc = t.reshape(b, n, c, k).transpose(2, 3).reshape(b, n * k, c)     # for X = T x_c B
    t_cn = t.reshape(b, n, c * k).transpose(1, 2)                          # (B, C*K, N) view, for Y = T x_n A
    mixed = precision == "auto" and n * c * k * rank >= 2 ** 22
    if mixed:
        t32_nkc, t32_cn = t_nkc.float(), t.reshape(b, n, c * k).float().transpose(1, 2)

    grams_s = [f.transpose(1, 2) @ f for f in spatial]
    gram_b = bf.transpose(1, 2) @ bf
    errors: list[float] = []
    converged = False
    it = 0
    cached_x = None                  # X = T x_c B of an accepted line-search point
    acc_pow, acc_fail = 2.0, 0       # extrapolation step it**(1/acc_pow), as in TensorLy's parafac
    with iteration_progress(n_iter, f"cp als rank {rank} {tuple(t.shape[1:])}", callback) as report:
        for it in range(1, n_iter + 1):
            previous = (a, bf, list(spatial))
            # ---- a: MTTKRP via X = T x_c B, then contract the spatial Khatri-Rao product
            kr = _khatri_rao(spatial, b, rank, t)                              # (B, K, R)
            low = mixed and (not errors or errors[-1] > 1e-3)
            wd = torch.float32 if low else torch.float64   # the big (N|C, K, R) intermediates
            if cached_x is not None and cached_x.dtype == wd:
                x = cached_x
            else:
                x = ((t32_nkc if low else t_nkc) @ bf.to(wd)).reshape(b, n, k, rank)
            cached_x = None
            m_a = (x * kr.to(wd).unsqueeze(1)).sum(2).double()
            v = _hadamard([gram_b, *grams_s])
            a, _ = _prox(v, m_a, a, damping, floor)
            gram_a = _gram(a, low)
            # ---- spatial factors: Q = X x_n A, a (B, K, R) tensor
            if spatial:
                q = (x * a.to(wd).unsqueeze(2)).sum(1).double().reshape(b, *sdims, rank)
                for ax in range(len(spatial)):
                    m_s = _spatial_mttkrp(q, spatial, ax)
                    v = _hadamard([gram_a, gram_b, *(g for j, g in enumerate(grams_s) if j != ax)])
                    spatial[ax], _ = _prox(v, m_s, spatial[ax], damping, floor)
                    grams_s[ax] = spatial[ax].transpose(1, 2) @ spatial[ax]
                kr = _khatri_rao(spatial, b, rank, t)
            del x
            # ---- b: MTTKRP via Y = T x_n A
            y = ((t32_cn if low else t_cn) @ a.to(wd)).reshape(b, c, k, rank)
            m_b = (y * kr.to(wd).unsqueeze(1)).sum(2).double()
            del y
            v = _hadamard([gram_a, *grams_s])
            bf, _ = _prox(v, m_b, bf, damping, floor)
            gram_b = _gram(bf, low)
            # ---- error from Grams and the last MTTKRP: ||T||^2 - 2<T, model> + ||model||^2
            inner = (bf * m_b).sum((1, 2))
            model2 = (v * gram_b).sum((1, 2))
            errors.append(_error(t, norm2, total2, inner, model2, [a, bf, *spatial]))
            # ---- rebalance column norms (the model and hence the error are unchanged)
            grams = [gram_a, gram_b, *grams_s]
            norms = torch.stack([g.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt() for g in grams])   # (M, B, R)
            geo = norms.clamp_min(1e-300).log().mean(0).exp()
            ok = (norms > 0).all(0)
            sc = torch.where(ok, geo / norms.clamp_min(1e-300), torch.ones_like(norms))
            a, bf = a * sc[0].unsqueeze(1), bf * sc[1].unsqueeze(1)
            gram_a = gram_a * sc[0].unsqueeze(1) * sc[0].unsqueeze(2)
            gram_b = gram_b * sc[1].unsqueeze(1) * sc[1].unsqueeze(2)
            for j in range(len(spatial)):
                s = sc[2 + j]
                spatial[j] = spatial[j] * s.unsqueeze(1)
                grams_s[j] = grams_s[j] * s.unsqueeze(1) * s.unsqueeze(2)
            # ---- line search (Bro's extrapolation): try previous + s * (the sweep's step),
            # keep it only if the error drops, so the sequence stays non-increasing.  When kept, its
            # X = T x_c B is the next sweep's first MTTKRP.
            if linesearch and it > 2 and errors[-1] > 1e-13:
                step = it ** (1.0 / acc_pow)
                cand = [p + step * (f - p) for p, f in zip([previous[0], previous[1], *previous[2]], [a, bf, *spatial])]
                ca, cb, cs = cand[0], cand[1], cand[2:]
                ckr = _khatri_rao(cs, b, rank, t)
                cx = ((t32_nkc if low else t_nkc) @ cb.to(wd)).reshape(b, n, k, rank)
                c_inner = (ca * (cx * ckr.to(wd).unsqueeze(1)).sum(2).double()).sum((1, 2))
                c_grams = [_gram(ca, low), _gram(cb, low), *[f.transpose(1, 2) @ f for f in cs]]
                c_model2 = c_grams[0]
                for g in c_grams[1:]:
                    c_model2 = c_model2 * g
                c_err = _error(t, norm2, total2, c_inner, c_model2.sum((1, 2)), cand)
                if c_err < errors[-1]:
                    a, bf, spatial = ca, cb, list(cs)
                    gram_a, gram_b, grams_s = c_grams[0], c_grams[1], c_grams[2:]
                    errors[-1] = c_err
                    cached_x = cx
                    acc_fail = 0
                else:
                    acc_fail += 1
                    if acc_fail == 4:
                        acc_pow, acc_fail = acc_pow + 1.0, 0
            report(it, errors[-1])
            if len(errors) > 1 and abs(errors[-2] - errors[-1]) <= tol * max(errors[-2], 1e-300):
                converged = True
                break
            if errors[-1] < 1e-13:
                converged = True
                break
    return CPResult([a, bf, *spatial], errors, it if n_iter else 0, converged)


def _error(t, norm2, total2, inner, model2, factors) -> float:
    """Relative error from ``||T||^2 - 2<T, model> + ||model||^2`` (per batch item, summed)."""
    err = math.sqrt(float((norm2 - 2 * inner + model2).clamp_min(0).sum()) / total2)
    if err < 1e-5:   # below the formula's cancellation floor (~1e-8): measure the residual itself
        err = float((cp_reconstruct(factors) - t).norm()) / math.sqrt(total2)
    return err


def _hadamard(mats: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise product of ``(B, R, R)`` matrices (a new tensor)."""
    out = mats[0] * mats[1] if len(mats) > 1 else mats[0].clone()
    for m in mats[2:]:
        out.mul_(m)
    return out


def _gram(f: torch.Tensor, low: bool) -> torch.Tensor:
    """``f^T f`` for ``f: (B, d, R)``; in float32 (symmetrized) during the low-precision phase."""
    if not low:
        return f.transpose(1, 2) @ f
    f32 = f.float()
    g = (f32.transpose(1, 2) @ f32).double()
    return (g + g.transpose(1, 2)) / 2


def _prox(gram, mttkrp, old, damping, floor):
    """Proximal ALS update: argmin_U ||T - [[..U..]]||^2 + lam ||U - old||^2 (Gram form)."""
    diag = gram.diagonal(dim1=1, dim2=2)
    lam = damping * diag.mean(-1) + floor                                     # (B,)
    for _ in range(4):
        system = gram.clone()
        system.diagonal(dim1=1, dim2=2).add_(lam.unsqueeze(-1))
        chol, info = torch.linalg.cholesky_ex(system)
        if not bool((info > 0).any()):
            break
        lam = 100 * lam + 1e-8 * diag.abs().amax(-1)   # round-off made it indefinite: damp more
    else:
        chol = torch.linalg.cholesky(system)
    rhs = mttkrp + lam[:, None, None] * old
    return torch.cholesky_solve(rhs.transpose(1, 2), chol).transpose(1, 2), lam


def _truncated_svd_cp(matrices: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """Optimal rank-``rank`` CP of a batch of matrices ``(B, N, C)``: balanced factors of
    :func:`.linalg.truncated_svd`, zero-padded to ``rank`` terms."""
    k = min(rank, *matrices.shape[1:])
    left, right = truncated_svd(matrices, k)
    a, b = left, right.transpose(1, 2)
    if k < rank:
        a = torch.cat([a, a.new_zeros(a.shape[0], a.shape[1], rank - k)], 2)
        b = torch.cat([b, b.new_zeros(b.shape[0], b.shape[1], rank - k)], 2)
    return [a, b]


# ---------------------------------------------------------------------------------- the method
@dataclass(frozen=True)
class CP(Method):
    """Lebedev et al. 2015: 1x1 C->R, depthwise 1-D conv per spatial axis, 1x1 R->N (+bias).

    Options: ``form`` (``"separable"`` or ``"folded"``: one depthwise conv over all spatial axes),
    and for the ALS fit ``n_iter``, ``tol``, ``init`` (``"svd"``, ``"slices"``, ``"random"``),
    ``damping``, ``seed``, ``precision`` and ``linesearch`` (see :func:`cp_als`).  :meth:`cost`
    is exact for the configured form, so ``macs_ratio`` targets are met on that form's cost.
    """

    form: str = "separable"
    n_iter: int = 50
    tol: float = 1e-6
    init: str = "svd"
    damping: float = 1e-7
    seed: int = 0
    precision: str = "auto"
    linesearch: bool = True

    name = "cp"
    supported_dims = (1, 2, 3)
    supports_energy = False         # there is no spectrum to truncate

    def __post_init__(self):
        for option, value, allowed in (("form", self.form, FORMS), ("init", self.init, INITS),
                                       ("precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise ValueError(f"cp: {option} must be one of {allowed}, got {value!r}")

    @property
    def factor_names(self) -> tuple[str, ...]:
        """``first (g R, C/g)``, then one ``axis{a} (g R, k_a)`` per spatial axis (separable form) or
        one ``spatial (g R, *k)`` depthwise kernel per term (folded form), then ``last (N, R)``."""
        return ("first", "axis*", "last") if self.form == "separable" else ("first", "spatial", "last")

    # ------------------------------------------------------------------ ranks
    def full_rank(self, spec: ConvSpec) -> Ranks:
        return (full_cp_rank((spec.out_per_group, spec.in_per_group, *spec.kernel_size)),)

    def factorization_cost(self, spec: ConvSpec, ranks: Ranks) -> float:
        """Per group: the initialization (counted as one SVD of the kernel matrix) plus ``n_iter`` ALS
        sweeps of ``~6 numel R`` flops per mode (Kolda & Bader 2009, sec. 3.4: the MTTKRP and the
        normal equations).  A 1x1 kernel is one truncated SVD; at the full rank :func:`exact_cp` only
        copies the kernel into one factor per mode."""
        (r,) = ranks
        g, ng, cg, kv = spec.groups, spec.out_per_group, spec.in_per_group, spec.kernel_volume
        if r >= self.full_rank(spec)[0]:
            return float(g * ng * cg * kv * (spec.dim + 2))
        if spec.is_pointwise:
            return g * truncated_svd_flops(ng, cg, r)
        return g * svd_flops(ng, cg * kv) + self.n_iter * 6.0 * g * ng * cg * kv * r * (spec.dim + 2)

    # ------------------------------------------------------------------ math
    def factorize(self, weight: torch.Tensor, spec: ConvSpec, ranks: Ranks, *,
                  calibration=None) -> dict[str, torch.Tensor]:
        """``weight: (N, C/g, *k)`` -> ``first (g*R, C/g)``, ``axis{a} (g*R, k_a)`` or ``spatial (g*R, *k)``
        (see :attr:`factor_names`), ``last (N, R)``."""
        (r,) = ranks
        g = spec.groups
        t = weight.detach().to(torch.float64).reshape(g, spec.out_per_group, spec.in_per_group, *spec.kernel_size)
        if r >= self.full_rank(spec)[0]:
            fs = exact_cp(t, r)
        elif spec.is_pointwise:
            fs = _truncated_svd_cp(t.reshape(g, spec.out_per_group, spec.in_per_group), r)
            fs += [t.new_ones(g, 1, r) for _ in spec.kernel_size]
        else:
            fs = cp_als(t, r, n_iter=self.n_iter, tol=self.tol, init=self.init, damping=self.damping,
                        seed=self.seed, precision=self.precision, linesearch=self.linesearch).factors
        a, b, spatial = fs[0], fs[1], fs[2:]
        out = {"first": b.transpose(1, 2).reshape(g * r, spec.in_per_group),
               "last": a.reshape(spec.out_channels, r)}
        axes = [h.transpose(1, 2).reshape(g * r, spec.kernel_size[ax]) for ax, h in enumerate(spatial)]
        if self.form == "separable":
            out.update((f"axis{ax}", h) for ax, h in enumerate(axes))
        else:
            out["spatial"] = _fold(axes).reshape(g * r, *spec.kernel_size)
        return out

    def _split(self, factors: dict[str, torch.Tensor], spec: ConvSpec, r: int) -> list[torch.Tensor]:
        g = spec.groups
        a = factors["last"].reshape(g, spec.out_per_group, r)
        b = factors["first"].reshape(g, r, spec.in_per_group).transpose(1, 2)
        spatial = [factors[f"axis{ax}"].reshape(g, r, k).transpose(1, 2) for ax, k in enumerate(spec.kernel_size)]
        return [a, b, *spatial]

    def reconstruct(self, factors: dict[str, torch.Tensor], spec: ConvSpec) -> torch.Tensor:
        """Dense kernel from ``first``, ``last`` and either ``axis{a}`` or ``spatial: (g*R, *k)``,
        a free depthwise kernel per term (what a folded module holds, also after fine-tuning)."""
        r = factors["last"].shape[1]
        g = spec.groups
        if "spatial" in factors:
            a = factors["last"].reshape(g, spec.out_per_group, 1, r)
            b = factors["first"].reshape(g, r, spec.in_per_group).transpose(1, 2).unsqueeze(1)
            s = factors["spatial"].reshape(g, r, spec.kernel_volume)
            dense = (a * b).reshape(g, -1, r) @ s                              # (g, N/g * C/g, K)
        else:
            dense = cp_reconstruct(self._split(factors, spec, r))             # (g, N/g, C/g, *k)
        return dense.reshape(spec.out_channels, spec.in_per_group, *spec.kernel_size)

    def factors_of(self, module: Factorized) -> dict[str, torch.Tensor]:
        """The factors a built (possibly fine-tuned) module computes with, for :meth:`reconstruct`."""
        spec = module.spec
        weights = [conv_of(piece).weight.detach().double() for piece in module]
        out = {"first": weights[0].reshape(weights[0].shape[0], -1),
               "last": weights[-1].reshape(weights[-1].shape[0], -1)}
        middle = weights[1:-1]
        if self.form == "folded":
            out["spatial"] = middle[0].reshape(middle[0].shape[0], *spec.kernel_size)
        else:
            for ax, w in enumerate(middle):
                out[f"axis{ax}"] = w.reshape(w.shape[0], -1)
        return out

    # ------------------------------------------------------------------ module
    def build(self, spec: ConvSpec, ranks: Ranks, factors=None, *, dtype=None, device=None) -> Factorized:
        (r,) = ranks
        g = spec.groups
        gr = g * r
        kw = dict(dtype=dtype, device=device)
        first = make_conv(spec, spec.in_channels, gr, groups=g, **kw)
        if self.form == "separable":
            spatial = [make_conv(spec, gr, gr, axes=[ax], groups=gr, **kw) for ax in range(spec.dim)]
        else:
            spatial = [make_conv(spec, gr, gr, axes=range(spec.dim), groups=gr, **kw)]
        last = make_conv(spec, gr, spec.out_channels, groups=g, bias=spec.bias, **kw)
        if factors is not None:
            copy_into(first, factors["first"])
            names = [f"axis{ax}" for ax in range(spec.dim)] if self.form == "separable" else ["spatial"]
            for piece, name in zip(spatial, names):
                copy_into(piece, factors[name])
            copy_into(last, factors["last"], factors.get("bias"))
        return self.factorized(spec, ranks, first, *spatial, last)

    def cost(self, spec: ConvSpec, ranks: Ranks, input_size: Sequence[int] = ()) -> Cost:
        """Exact params / MACs of :meth:`build`: the first 1x1 runs at the input resolution, each
        depthwise conv at the resolution after the axes convolved so far."""
        (r,) = ranks
        gr = spec.groups * r
        size = tuple(input_size)
        params = gr * spec.in_per_group + spec.out_channels * r + (spec.out_channels if spec.bias else 0)
        macs = math.prod(size) * gr * spec.in_per_group
        if self.form == "separable":
            for ax in range(spec.dim):
                params += gr * spec.kernel_size[ax]
                macs += math.prod(spec.output_size(size, axes=range(ax + 1))) * gr * spec.kernel_size[ax]
        else:
            params += gr * spec.kernel_volume
            macs += math.prod(spec.output_size(size)) * gr * spec.kernel_volume
        macs += math.prod(spec.output_size(size)) * spec.out_channels * r
        return Cost(params=params, macs=macs)


def _fold(axes: list[torch.Tensor]) -> torch.Tensor:
    """Per term the outer product ``h_0 x h_1 x ...`` of its axis filters ``(T, k_a)``: ``(T, prod k)``, row-major."""
    kernel = torch.ones(axes[0].shape[0], 1, dtype=axes[0].dtype, device=axes[0].device)
    for h in axes:
        kernel = (kernel.unsqueeze(2) * h.unsqueeze(1)).reshape(kernel.shape[0], -1)
    return kernel

"""Small linear-algebra helpers shared by the methods (float64 tensors, batched over leading axes).

Two ways to a truncated SVD, each where it is fastest and accurate enough:

* :func:`truncated_svd` / :func:`singular_values`: LAPACK's SVD on the *tall* orientation (3-4x
  faster than on the wide one here). Exact singular values, so condition numbers and the
  "error equals discarded energy" property hold to round-off.
* :func:`truncated_factors` / :func:`gram_singular_values` / :func:`leading_left`: the
  eigendecomposition of the smaller Gram matrix. ``torch.linalg.eigh`` of an n x n Gram matrix is
  one to two orders of magnitude faster than ``torch.linalg.svd`` of the 512 x 4608 float64 matrix
  it comes from (0.05 s against 3-4 s measured here), and the truncation it gives is optimal up to
  ``O(eps ||M||^2)`` in squared error. Tiny singular values are not resolved, so condition numbers
  must not come from it.

Cost options (issue 14, "cost limits"), taken by :func:`truncated_svd` and by methods that expose
them as ``svd=`` / ``precision=`` fields (validated by :func:`check_svd_options`):

* ``svd="exact"`` (default): LAPACK below the full rank.  *At* the full rank every route is exact
  (the kept subspace is the whole column space), so a large matrix takes the Gram route there:
  the full-rank channel SVD of VGG-11's 4096 x 25088 classifier is a 4096 x 4096 ``eigh`` instead
  of a 25088 x 4096 SVD (all of VGG-11 at full rank in float64: 23 s here, against more than 300 s).
* ``svd="gram"``: always the Gram route (see above).
* ``svd="randomized"``: a seeded randomized range finder with power iterations (Halko, Martinsson,
  Tropp, "Finding Structure with Randomness", SIAM Review 2011, Alg. 4.4 and 5.1; the algorithm
  of ``torch.svd_lowrank``, written out so it draws from its own generator and leaves the global
  RNG alone) when the rank is well below full; otherwise the Gram route.  Near-optimal, not optimal.
* ``precision="float32"``: the decomposition runs in float32 (factors are returned in the input's
  dtype): for float32 models, where float64 accuracy is not needed.

:func:`svd_flops`, :func:`gram_flops`, :func:`randomized_flops` and :func:`truncated_svd_flops` count
the flops of these routes, for :meth:`convfactor.methods.base.Method.factorization_cost`.

:func:`iteration_progress` is the per-iteration progress of the long solvers (CP's ALS, the
low-rank + sparse ADMM): a tqdm bar on an interactive terminal, and an optional callback.

Hand-written because torch.linalg has no truncated, balanced factorization.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

__all__ = ["truncated_svd", "singular_values", "top_eigh", "gram_singular_values", "truncated_factors",
           "leading_left", "randomized_factors", "shrink_singular_values", "check_svd_options", "SVD_MODES",
           "PRECISIONS", "iteration_progress", "grouped_matrix", "svd_flops", "gram_flops", "randomized_flops",
           "truncated_svd_flops"]

#: ``svd=`` choices (see the module docstring)
SVD_MODES = ("exact", "gram", "randomized")
#: ``precision=`` choices
PRECISIONS = ("float64", "float32")
#: above this many ``m * n * min(m, n)`` multiply-adds a full-rank request takes the Gram route
LARGE_SVD = 2 ** 24


def grouped_matrix(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``weight: (N, C/g, *k)`` -> ``(g, N/g, C/g * prod(k))``: each group's kernel matrix."""
    n = weight.shape[0]
    return weight.reshape(groups, n // groups, -1)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.svdvals`` of ``matrix: (..., m, n)``, computed on the tall orientation (faster)."""
    return torch.linalg.svdvals(matrix.mT if matrix.shape[-2] < matrix.shape[-1] else matrix)


def check_svd_options(owner: str, svd: str, precision: str) -> None:
    """A one-line ValueError naming ``owner`` unless ``svd`` is in :data:`SVD_MODES` and ``precision``
    in :data:`PRECISIONS`."""
    if svd not in SVD_MODES:
        raise ValueError(f"{owner}: svd must be one of {SVD_MODES}, got {svd!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"{owner}: precision must be one of {PRECISIONS}, got {precision!r}")


def truncated_svd(matrix: torch.Tensor, rank: int, *, svd: str = "exact", precision: str = "float64",
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-``rank`` factors of a batch of matrices.

    ``matrix: (..., m, n)`` -> ``left: (..., m, r)``, ``right: (..., r, n)`` with
    ``left @ right`` the optimal rank-r approximation (``svd="exact"``, ``"gram"``; near-optimal
    with ``"randomized"``), in ``matrix``'s dtype.  Exact at the full rank ``min(m, n)`` whatever
    the options (up to float32 round-off with ``precision="float32"``).  ``seed``: the randomized
    route's generator.
    """
    check_svd_options("truncated_svd", svd, precision)
    m, n = matrix.shape[-2:]
    work = matrix.float() if precision == "float32" and matrix.dtype == torch.float64 else matrix
    full = rank >= min(m, n)
    if svd == "gram" or (full and m * n * min(m, n) >= LARGE_SVD):
        left, right = truncated_factors(work, min(rank, m, n))
    elif svd == "randomized" and not full:
        left, right = randomized_factors(work, rank, seed=seed)
    else:
        left, right = _lapack_factors(work, rank)
    return left.to(matrix.dtype), right.to(matrix.dtype)


def _lapack_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`truncated_svd` by LAPACK's SVD."""
    if matrix.shape[-2] < matrix.shape[-1]:       # LAPACK is ~4x faster on the tall orientation
        v, s, uh = torch.linalg.svd(matrix.mT, full_matrices=False)
        u, vh = uh.mT, v.mT
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[..., :rank].sqrt()
    return u[..., :rank] * root.unsqueeze(-2), root.unsqueeze(-1) * vh[..., :rank, :]


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


def _orthonormal(columns: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(columns).Q


def randomized_factors(matrix: torch.Tensor, rank: int, *, oversample: int = 10, power_iters: int = 2,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Near-optimal balanced rank-``rank`` factors by a randomized range finder.

    Halko, Martinsson, Tropp 2011: Alg. 4.4 (randomized subspace iteration, ``power_iters`` steps,
    re-orthonormalized each half-step) for an orthonormal ``Q: (..., m, q)``, ``q = rank +
    oversample``, then Alg. 5.1: the optimal rank-``rank`` factors of the small ``Q^T M: (..., q, n)``
    (:func:`truncated_factors`), ``left = Q left_small``.  ``matrix: (..., m, n)`` ->
    ``left: (..., m, r)``, ``right: (..., r, n)``.  Seeded (its own generator); when ``q`` reaches
    ``min(m, n)`` there is nothing to gain and :func:`truncated_factors` is used instead.
    """
    m, n = matrix.shape[-2:]
    q = rank + oversample
    if q >= min(m, n):
        return truncated_factors(matrix, rank)
    gen = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(*matrix.shape[:-2], n, q, generator=gen, dtype=matrix.dtype).to(matrix.device)
    basis = _orthonormal(matrix @ omega)                                      # (..., m, q)
    for _ in range(power_iters):
        basis = _orthonormal(matrix @ _orthonormal(matrix.mT @ basis))
    left, right = truncated_factors(basis.mT @ matrix, rank)                  # (..., q, r), (..., r, n)
    return basis @ left, right


def shrink_singular_values(matrix: torch.Tensor, tau: float) -> torch.Tensor:
    """Singular value thresholding ``U max(S - tau, 0) V^T`` of ``matrix: (m, n)`` (Cai, Candes, Shen 2010),
    via the eigendecomposition of the smaller Gram matrix.

    With ``M M^T = U S^2 U^T`` (``m <= n``): ``SVT(M) = U f(S) U^T M``, ``f(s) = max(s - tau, 0) / s``
    (0 where ``s <= tau``, so no small singular value is divided by).  One ``m x m`` ``eigh`` and two
    ``m x m x n`` products (the Gram matrix and the projection) instead of an SVD: the inner step of
    the low-rank + sparse ADMM.
    Singular values below ``~sqrt(eps) s_max`` are not resolved, which matters only for ``tau`` that small.
    """
    m, n = matrix.shape[-2:]
    if m > n:
        return shrink_singular_values(matrix.mT, tau).mT
    values, vectors = torch.linalg.eigh(matrix @ matrix.mT)
    s = values.clamp_min(0).sqrt()
    keep = s > tau
    factor = torch.where(keep, (s - tau) / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    return ((vectors * factor.unsqueeze(-2)) @ vectors.mT) @ matrix       # m^3 + m^2 n multiply-adds


# ---------------------------------------------------------------------------- flop estimates
# What :meth:`convfactor.methods.base.Method.factorization_cost` adds up: floating-point operations
# (a multiply-add counts 2), for a "this may take a while" estimate, not a promise.
def svd_flops(m: int, n: int) -> float:
    """Flops of a thin SVD (with singular vectors) of an ``m x n`` matrix: ``4 M N^2 + 8 N^3``,
    ``M >= N`` the larger side (Golub & Van Loan, *Matrix Computations*, 4th ed., sec. 8.6.3, R-SVD)."""
    big, small = max(m, n), min(m, n)
    return 4.0 * big * small ** 2 + 8.0 * small ** 3


def gram_flops(m: int, n: int) -> float:
    """Flops of a leading basis from the smaller Gram matrix of an ``m x n`` matrix: ``M N^2`` for the
    symmetric product and ``9 N^3`` for its ``eigh`` with eigenvectors (Golub & Van Loan sec. 8.3)."""
    big, small = max(m, n), min(m, n)
    return float(big * small ** 2) + 9.0 * small ** 3


def randomized_flops(m: int, n: int, rank: int, *, oversample: int = 10, power_iters: int = 2) -> float:
    """Flops of :func:`randomized_factors` on an ``m x n`` matrix: ``2 + 2 power_iters`` products with
    it (``2 m n q`` each, ``q = rank + oversample``), ``1 + 2 power_iters`` QRs (``~4 max(m, n) q^2``)
    and the small ``q x n`` factorization (Halko, Martinsson, Tropp 2011, Alg. 4.4 and 5.1)."""
    q = rank + oversample
    if q >= min(m, n):
        return gram_flops(m, n)
    products = (2 + 2 * power_iters) * 2.0 * m * n * q
    return products + (1 + 2 * power_iters) * 4.0 * max(m, n) * q ** 2 + gram_flops(q, n)


def truncated_svd_flops(m: int, n: int, rank: int, svd: str = "exact") -> float:
    """Flops of :func:`truncated_svd` of one ``m x n`` matrix at ``rank``, by the route it takes there."""
    full = rank >= min(m, n)
    if svd == "gram" or (full and m * n * min(m, n) >= LARGE_SVD):
        return gram_flops(m, n)
    if svd == "randomized" and not full:
        return randomized_flops(m, n, rank)
    return svd_flops(m, n)


def _progress_bar(total: int, desc: str):
    """A tqdm bar on an interactive stderr (None when tqdm is missing or stderr is not a TTY); it
    appears only after 2 s, so quick problems print nothing, and leaves no line behind."""
    if not getattr(sys.stderr, "isatty", lambda: False)():
        return None
    try:
        from tqdm.auto import tqdm          # optional dependency
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, delay=2.0, unit="it", file=sys.stderr)


@contextmanager
def iteration_progress(total: int, desc: str, callback: Callable[[int, int, float | None], None] | None = None,
                       metric: str = "error") -> Iterator[Callable[[int, float | None], None]]:
    """Report the iterations of a long solver: ``with iteration_progress(n, "cp als") as step: ...
    step(i, error)``.

    ``step(i, error)`` advances a tqdm bar (interactive terminals only, see :func:`_progress_bar`;
    ``error`` shown as ``metric=...``) and calls ``callback(i, total, error)`` when given (``i``
    counts from 1; ``error`` may be None).
    """
    bar = _progress_bar(total, desc)
    last_postfix = [0.0]

    def step(i: int, error: float | None = None) -> None:
        if bar is not None:
            bar.update(i - bar.n)
            now = time.monotonic()
            if error is not None and now - last_postfix[0] > 0.5:
                bar.set_postfix_str(f"{metric}={error:.3g}", refresh=False)
                last_postfix[0] = now
        if callback is not None:
            callback(i, total, error)

    try:
        yield step
    finally:
        if bar is not None:
            bar.close()

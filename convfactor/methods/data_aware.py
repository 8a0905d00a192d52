"""Data-aware (response) fitting: choose factors that preserve a layer's *outputs* on real inputs.

"Matrix regression instead of matrix approximation": with ``X`` the layer's inputs (see
:func:`convfactor.compression.calibration.collect_inputs`) and ``Y = W * X`` its responses, minimize
``||Y - W_hat * X||`` instead of ``||W - W_hat||``.

* ``channel_svd`` / ``linear_svd`` have a closed form (Zhang, Zou, He, Sun, "Accelerating Very Deep
  Convolutional Networks for Classification and Detection", TPAMI 2016, sec. 3.1):
  with ``U_r`` the top-r eigenvectors of the response covariance ``sum (y - ybar)(y - ybar)^T``,
  ``W_hat = U_r U_r^T W`` (a 1x1 ``U_r`` after the kxk conv ``U_r^T W``) and the bias absorbs the
  mean, ``b_hat = b + (I - U_r U_r^T) ybar``.  It is the generalized SVD of ``W`` in the metric of
  the input covariance, computed without ever inverting it; exact at full rank.
* Every other method (spatial_svd, tucker2, cp, depthwise, basis, ...) is fitted weight-only, then
  the *last* piece of its chain (a conv or Linear carrying the bias) is re-solved by (ridge) least
  squares on the captured responses, the rest of the chain fixed.  With ``alternate=k`` and a
  two-piece chain ending in a 1x1 (or Linear), the first piece is re-solved too, k alternations.
* ``relu=True`` (the layer is followed by a ReLU): Zhang et al.'s nonlinear case (sec. 3.2),
  ``min sum ||r(y) - r(W_hat x + b_hat)||^2``, by their auxiliary-variable alternation: an
  element-wise closed-form z-step ``min (r(y) - r(z))^2 + lam (z - y_hat)^2`` and a (reduced-rank)
  regression step onto ``z``, with ``lam`` growing from 0.01 to 1 over ``iters`` steps; the best
  iterate by the true objective is kept (it is never worse than the linear fit).

Settings (:class:`DataAwareSettings`; given to ``factorize(..., calibration=X, ...)`` or as rule
keys next to ``data_aware: true``): ``relu`` (bool), ``alternate`` (int), ``iters`` (ReLU steps,
default 25), ``ridge`` (relative Tikhonov term, default 1e-8), ``max_positions`` (rows sampled for
the least squares and the ReLU fit, default 16384), ``seed`` (of that sampling).  A method with
``uses_calibration`` (``lowrank_sparse``) is handed the inputs and fits the linear responses itself.
TT is not supported (its module is not a chain of convs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..spec.convspec import ConvSpec, UnsupportedLayer, is_conv
from .base import Factorized, Method, Ranks
from .channel_svd import ChannelSVD

__all__ = ["DataAwareSettings", "factorize_data_aware", "prepare_inputs", "patches", "rows", "fit_response_svd",
           "refit_last", "relu_z_step", "lam_schedule"]


@dataclass(frozen=True)
class DataAwareSettings:
    """How a layer is fitted to its responses (see the module docstring)."""

    relu: bool = False
    alternate: int = 0
    iters: int = 25
    ridge: float = 1e-8
    max_positions: int = 16384
    seed: int = 0

    def __post_init__(self):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (self.alternate, self.iters)):
            raise ValueError(f"alternate and iters must be non-negative ints, got {self.alternate!r}, {self.iters!r}")
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge!r}")
        if not (isinstance(self.max_positions, int) and self.max_positions >= 1):
            raise ValueError(f"max_positions must be a positive int, got {self.max_positions!r}")


# ---------------------------------------------------------------------------- data plumbing
def prepare_inputs(calibration, spec: ConvSpec, *, device=None, dtype=None) -> list[torch.Tensor]:
    """Calibration inputs as a list of batches shaped like the layer's input (in ``dtype``)."""
    items = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if not items:
        raise ValueError("calibration is empty")
    out = []
    for x in items:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calibration must hold tensors, got {type(x).__name__}")
        if spec.is_linear:
            if x.shape[-1] != spec.in_channels:
                raise ValueError(f"calibration rows have {x.shape[-1]} features, the layer takes {spec.in_channels}")
            x = x.reshape(-1, spec.in_channels)
        elif x.dim() != spec.dim + 2 or x.shape[1] != spec.in_channels:
            raise ValueError(f"calibration inputs must be (B, {spec.in_channels}, *{spec.dim} spatial), "
                             f"got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("calibration contains NaN or Inf values")
        out.append(x.detach().to(device=device, dtype=dtype))
    return out


def rows(y: torch.Tensor) -> torch.Tensor:
    """Channel-last rows: ``(B, N, *S)`` -> ``(B * prod(S), N)``; ``(P, N)`` is returned as is."""
    return y if y.dim() == 2 else y.movedim(1, -1).reshape(-1, y.shape[1])


def patches(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """im2col for any conv of ``spec`` (padding mode, stride, dilation, 1/2/3-D).

    ``x: (B, C, *S)`` -> ``(B * prod(out), groups, C/groups * prod(kernel))`` in the order of
    ``weight.reshape(N, -1)``; a Linear's ``(P, C)`` -> ``(P, 1, C)``.
    """
    if spec.is_linear:
        return x.reshape(-1, 1, spec.in_channels)
    pad = []
    for lo, hi in reversed(spec.padding):
        pad += [lo, hi]
    if any(pad):
        mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
        x = nn.functional.pad(x, pad, mode=mode)
    for a, (k, s, d) in enumerate(zip(spec.kernel_size, spec.stride, spec.dilation)):
        x = x.unfold(2 + a, d * (k - 1) + 1, s)[..., ::d]
    # (B, C, *out, *k) -> (B, *out, C, *k)
    x = x.movedim(1, 1 + spec.dim)
    n_pos = math.prod(x.shape[:1 + spec.dim])
    return x.reshape(n_pos, spec.groups, spec.in_per_group * spec.kernel_volume)


class _RidgeLS:
    """Ridge least squares ``argmin_w ||a w - b||^2 + ridge * mean(diag(a^T a)) ||w||^2`` for many ``b``.

    ``a: (P, q)``; the regularized Gram matrix is factorized once (Cholesky), so each solve costs
    one ``a^T b`` product.
    """

    def __init__(self, a: torch.Tensor, ridge: float):
        self.a = a
        gram = a.T @ a
        scale = gram.diagonal().mean()
        scale = scale if scale > 0 else torch.ones_like(scale)        # all-zero inputs: any w fits, take 0
        gram = gram + max(ridge, 1e-15) * scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        self.chol = torch.linalg.cholesky(gram)

    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(self.a.T @ b, self.chol)


def _solve(a: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor:
    return _RidgeLS(a, ridge)(b)


def lam_schedule(iters: int) -> list[float]:
    """Penalty weights of the ReLU alternation, geometric from 0.01 to 1."""
    if iters <= 1:
        return [1.0] * max(iters, 0)
    return [0.01 * 100 ** (i / (iters - 1)) for i in range(iters)]


def relu_z_step(target: torch.Tensor, y_hat: torch.Tensor, lam: float) -> torch.Tensor:
    """Element-wise ``argmin_z (target - relu(z))^2 + lam (z - y_hat)^2`` (Zhang et al. 2016, sec. 3.2).

    Two candidates: ``z <= 0`` gives ``min(0, y_hat)``; ``z >= 0`` gives ``max(0, (t + lam y_hat) / (1 + lam))``.
    """
    z_neg = y_hat.clamp(max=0)
    z_pos = ((target + lam * y_hat) / (1 + lam)).clamp(min=0)
    cost_neg = target ** 2 + lam * (z_neg - y_hat) ** 2
    cost_pos = (target - z_pos) ** 2 + lam * (z_pos - y_hat) ** 2
    return torch.where(cost_neg < cost_pos, z_neg, z_pos)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _sample(n: int, k: int, gen: torch.Generator) -> torch.Tensor | None:
    return None if n <= k else torch.randperm(n, generator=gen)[:k]


# ---------------------------------------------------------------------------- closed form (channel / linear SVD)
def _top_eigvecs(cov: torch.Tensor, r: int) -> torch.Tensor:
    _, vecs = torch.linalg.eigh(cov)                  # ascending
    return vecs[:, -r:].flip(-1)


def fit_response_svd(weight: torch.Tensor, bias: torch.Tensor | None, responses: torch.Tensor, rank: int,
                     groups: int = 1, *, relu: bool = False, iters: int = 25, ridge: float = 1e-8,
                     ) -> dict[str, torch.Tensor]:
    """Zhang et al.'s response reconstruction for a rank-``rank`` channel SVD.

    ``weight: (N, C/g, *k)``, ``bias: (N,)`` or None, ``responses: (P, N)`` = ``W * x`` at P sampled
    positions (no bias).  Returns channel_svd factors ``first: (g r, C/g, *k)``, ``second: (N, r)``
    and ``bias`` (when the layer has one).
    """
    n_out = weight.shape[0]
    n = n_out // groups
    firsts, seconds, biases = [], [], []
    for j in range(groups):
        w = weight[j * n:(j + 1) * n].reshape(n, -1)
        y = responses[:, j * n:(j + 1) * n]
        b = bias[j * n:(j + 1) * n] if bias is not None else None
        mu = y.mean(0) if b is not None else torch.zeros(n, dtype=y.dtype, device=y.device)
        yc = y - mu
        u = _top_eigvecs(yc.T @ yc, rank)                               # (n, r)
        left, right = u, u.T                                          # W_hat = left @ right @ W
        b_hat = b + mu - u @ (u.T @ mu) if b is not None else None
        if relu:
            left, right, b_hat = _relu_fit(y, b, left, right, b_hat, rank, iters, ridge)
        firsts.append(right @ w)
        seconds.append(left)
        if b_hat is not None:
            biases.append(b_hat)
    k = weight.shape[1:]
    factors = {"first": torch.cat(firsts).reshape(groups * rank, *k), "second": torch.cat(seconds)}
    if bias is not None:
        factors["bias"] = torch.cat(biases)
    return factors


def _relu_fit(y, b, left, right, b_hat, rank, iters, ridge):
    """Zhang et al. 2016 sec. 3.2: ``min ||r(y + b) - r(M y + b_hat)||``, ``M = left @ right`` of rank r."""
    target = (y + b if b is not None else y).clamp(min=0)
    has_bias = b is not None

    def objective(left, right, b_hat):
        pred = y @ (left @ right).T + (b_hat if has_bias else 0)
        return (target - pred.clamp(min=0)).pow(2).sum().item()

    def predict(left, right, b_hat):
        return y @ (left @ right).T + (b_hat if has_bias else 0)

    y_hat = predict(left, right, b_hat)
    best = ((target - y_hat.clamp(min=0)).pow(2).sum().item(), left, right, b_hat)
    ybar = y.mean(0) if has_bias else torch.zeros_like(y[0])
    yc = y - ybar
    solve = _RidgeLS(yc, ridge)
    cov = yc.T @ yc
    for lam in lam_schedule(iters):
        z = relu_z_step(target, y_hat, lam)
        zbar = z.mean(0) if has_bias else torch.zeros_like(z[0])
        m_ls = solve(z - zbar).T                                          # (n, n): z ~ m_ls y
        u = _top_eigvecs(m_ls @ cov @ m_ls.T, rank)                       # reduced-rank regression
        left, right = u, u.T @ m_ls
        b_hat = zbar - left @ (right @ ybar) if has_bias else None
        y_hat = predict(left, right, b_hat)
        value = (target - y_hat.clamp(min=0)).pow(2).sum().item()
        if value < best[0]:
            best = (value, left, right, b_hat)
    return best[1], best[2], best[3]


# ---------------------------------------------------------------------------- generic: refit the last piece
def _split_piece(piece: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """``(modules before the conv, the conv)`` of a chain piece (a conv, a Linear or Sequential(Pad, conv))."""
    if isinstance(piece, nn.Sequential) and len(piece) and (is_conv(piece[-1]) or isinstance(piece[-1], nn.Linear)):
        return list(piece)[:-1], piece[-1]
    if is_conv(piece) or isinstance(piece, nn.Linear):
        return [], piece
    raise UnsupportedLayer(f"data-aware fitting: the chain's last piece is a {type(piece).__name__}, "
                           f"not a conv or Linear")


def _conv_solvers(conv: nn.Module, design: torch.Tensor, ridge: float) -> list[_RidgeLS]:
    """One cached least-squares solver per group of ``conv`` (with a ones column for its bias)."""
    out = []
    for j in range(design.shape[1]):
        a = design[:, j]
        if conv.bias is not None:
            a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        out.append(_RidgeLS(a, ridge))
    return out


def _fit_conv(conv: nn.Module, design: torch.Tensor, target: torch.Tensor, ridge: float,
              solvers: list[_RidgeLS] | None = None) -> None:
    """Least-squares weight (and bias) of ``conv`` from ``design: (P, g, q)`` to ``target: (P, N)``."""
    spec = ConvSpec.from_module(conv)
    g, n = spec.groups, spec.out_per_group
    solvers = solvers or _conv_solvers(conv, design, ridge)
    weights, biases = [], []
    for j in range(g):
        sol = solvers[j](target[:, j * n:(j + 1) * n])                 # (q [+1], n)
        weights.append(sol[:design.shape[2]].T)
        if conv.bias is not None:
            biases.append(sol[-1])
    with torch.no_grad():
        conv.weight.copy_(torch.cat(weights).reshape(conv.weight.shape))
        if conv.bias is not None:
            conv.bias.copy_(torch.cat(biases))


def _conv_rows(conv: nn.Module, design: torch.Tensor) -> torch.Tensor:
    """``conv`` applied to im2col rows: ``(P, g, q)`` -> ``(P, N)``."""
    spec = ConvSpec.from_module(conv)
    w = conv.weight.to(design.dtype).reshape(spec.groups, spec.out_per_group, -1)
    out = torch.einsum("pgq,gnq->pgn", design, w).reshape(design.shape[0], -1)
    return out + conv.bias.to(design.dtype) if conv.bias is not None else out


def refit_last(module: Factorized, layer: nn.Module, xs: Sequence[torch.Tensor],
               settings: DataAwareSettings = DataAwareSettings()) -> Factorized:
    """Re-solve the last conv/Linear of ``module`` so it reproduces ``layer`` on ``xs``, in place.

    The modules run in their own dtype; the least squares are solved in float64.  With
    ``settings.alternate`` and a two-piece chain ending in a pointwise conv, the first piece is
    re-solved too (alternately).
    """
    pieces = list(module)
    pre, last = _split_piece(pieces[-1])
    prefix = nn.Sequential(*pieces[:-1], *pre)
    first_piece = _alternating_first(pieces, pre, ConvSpec.from_module(last)) if settings.alternate > 0 else None
    with torch.no_grad():
        _check_is_chain(module, prefix, last, xs[0][:2])
        design, target, first_rows = _sampled_rows(layer, prefix, last, first_piece, xs, settings)
    if settings.relu:
        _relu_refit(last, design, target, settings.iters, settings.ridge)
        return module
    _fit_conv(last, design, target, settings.ridge)
    if first_piece is not None:
        _alternate(first_piece[1], last, first_rows, target, settings)
    return module


def _alternating_first(pieces: list[nn.Module], pre: list[nn.Module], last_spec: ConvSpec):
    """``(modules before the first conv, the first conv)`` when the chain is two pieces whose last is a
    stride-1 unpadded pointwise conv (or Linear) and whose first has no groups and no bias; else None."""
    pointwise = last_spec.is_linear or (last_spec.is_pointwise and last_spec.stride == (1,) * last_spec.dim
                                        and all(p == (0, 0) for p in last_spec.padding))
    if len(pieces) != 2 or pre or last_spec.groups != 1 or not pointwise:
        return None
    try:
        first_pre, first = _split_piece(pieces[0])
    except UnsupportedLayer:
        return None
    return (first_pre, first) if ConvSpec.from_module(first).groups == 1 and first.bias is None else None


def _check_is_chain(module: Factorized, prefix: nn.Module, last: nn.Module, probe: torch.Tensor) -> None:
    """A module with its own forward must still compute ``last(prefix(x))``, or its last piece cannot be refitted."""
    if type(module).forward is nn.Sequential.forward:
        return
    tol = 1e-9 if probe.dtype == torch.float64 else 1e-4
    if rel_diff(last(prefix(probe)).double(), module(probe).double()) > tol:
        raise UnsupportedLayer(f"data-aware fitting: {type(module).__name__}'s forward is not its chain "
                               f"of pieces, so its last piece cannot be refitted")


def _sampled_rows(layer, prefix, last, first_piece, xs, settings: DataAwareSettings):
    """Sampled im2col rows of the last piece's input ``(P, g, q)``, the layer's responses ``(P, N)`` and,
    with ``first_piece`` (``(modules before it, the first conv)``, when alternating) that conv's input
    rows ``(P, C k)``; all float64."""
    last_spec = ConvSpec.from_module(last)
    gen = torch.Generator().manual_seed(settings.seed)
    per_item = max(1, settings.max_positions // len(xs))
    designs, targets, firsts = [], [], []
    for x in xs:
        d = patches(prefix(x), last_spec).double()
        t = rows(layer(x)).double()
        if d.shape[0] != t.shape[0]:
            raise UnsupportedLayer("data-aware fitting: the chain's last piece does not map positions 1:1")
        idx = _sample(d.shape[0], per_item, gen)
        designs.append(d if idx is None else d[idx])
        targets.append(t if idx is None else t[idx])
        if first_piece is not None:
            first_pre, conv = first_piece
            f = patches(nn.Sequential(*first_pre)(x), ConvSpec.from_module(conv))[:, 0].double()
            firsts.append(f if idx is None else f[idx])
    return torch.cat(designs), torch.cat(targets), (torch.cat(firsts) if firsts else None)


def _alternate(first: nn.Module, last: nn.Module, xp: torch.Tensor, target: torch.Tensor,
               settings: DataAwareSettings) -> None:
    """Alternately re-solve ``first`` (unconstrained map projected on ``last``) and ``last`` (least squares)."""
    last_spec = ConvSpec.from_module(last)
    solve_x = _RidgeLS(xp, settings.ridge)
    for _ in range(settings.alternate):
        w2 = last.weight.double().reshape(last_spec.out_channels, -1)       # (N, r)
        resid = target - (last.bias.double() if last.bias is not None else 0)
        # min ||resid - xp W1^T W2^T||: W1 = W2^+ (resid^T xp) (xp^T xp)^-1
        coef = solve_x(resid)                                                # (Ck, N): unconstrained map
        w1 = torch.linalg.lstsq(w2, coef.T).solution                         # (r, Ck)
        with torch.no_grad():
            first.weight.copy_(w1.reshape(first.weight.shape))
        _fit_conv(last, patches(_rows_to_conv_input(xp @ w1.T, last_spec), last_spec), target, settings.ridge)


def _rows_to_conv_input(z: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Rows ``(P, r)`` as a batch a pointwise conv / Linear of ``spec`` accepts."""
    return z if spec.is_linear else z.reshape(z.shape[0], z.shape[1], *([1] * spec.dim))


def _relu_refit(last: nn.Module, design: torch.Tensor, target_pre: torch.Tensor, iters: int, ridge: float) -> None:
    """Zhang et al.'s alternation for the last piece: ``min ||r(y) - r(last(design))||``."""
    target = target_pre.clamp(min=0)
    solvers = _conv_solvers(last, design, ridge)
    _fit_conv(last, design, target_pre, ridge, solvers)

    def objective():
        return (target - _conv_rows(last, design).clamp(min=0)).pow(2).sum().item()

    best = (objective(), last.weight.detach().clone(), None if last.bias is None else last.bias.detach().clone())
    for lam in lam_schedule(iters):
        z = relu_z_step(target, _conv_rows(last, design), lam)
        _fit_conv(last, design, z, ridge, solvers)
        value = objective()
        if value < best[0]:
            best = (value, last.weight.detach().clone(), None if last.bias is None else last.bias.detach().clone())
    with torch.no_grad():
        last.weight.copy_(best[1])
        if last.bias is not None:
            last.bias.copy_(best[2])


# ---------------------------------------------------------------------------- entry point (compression/api.py)
def factorize_data_aware(layer: nn.Module, method: Method, spec: ConvSpec, ranks: Ranks, calibration,
                         settings: DataAwareSettings = DataAwareSettings()) -> Factorized:
    """:func:`convfactor.factorize` with ``calibration=X`` (the layer's inputs, a tensor or a list)."""
    weight = layer.weight.detach()
    xs = prepare_inputs(calibration, spec, device=weight.device, dtype=weight.dtype)   # convs run in the layer's dtype
    if method.uses_calibration:
        return _fit_by_method(layer, method, spec, ranks, xs, settings)
    if isinstance(method, ChannelSVD) and type(method).factorize is ChannelSVD.factorize:
        return _fit_channel_svd(layer, method, spec, ranks, xs, settings)
    factors = method.factorize(weight.to(torch.float64), spec, ranks)
    if layer.bias is not None:
        factors["bias"] = layer.bias.detach().double()
    module = method.build(spec, ranks, factors, dtype=weight.dtype, device=weight.device)
    return refit_last(module, layer, xs, settings)


def _fit_by_method(layer, method: Method, spec: ConvSpec, ranks: Ranks, xs, settings) -> Factorized:
    """A method that fits the (linear) responses itself is handed the inputs (statistics in float64)."""
    if settings.relu:
        raise ValueError(f"{method.name}: relu=True is not supported (the method fits linear responses itself)")
    weight = layer.weight.detach()
    factors = method.factorize(weight.to(torch.float64), spec, ranks, calibration=xs)
    if layer.bias is not None:
        factors.setdefault("bias", layer.bias.detach().double())
    return method.build(spec, ranks, factors, dtype=weight.dtype, device=weight.device)


def _fit_channel_svd(layer, method: ChannelSVD, spec: ConvSpec, ranks: Ranks, xs, settings) -> Factorized:
    """Zhang et al.'s closed form on the layer's responses (sampled positions for the ReLU fit)."""
    weight = layer.weight.detach()
    bias = layer.bias.detach().double() if layer.bias is not None else None
    gen = torch.Generator().manual_seed(settings.seed)
    per_item = max(1, settings.max_positions // len(xs))
    ys = []
    with torch.no_grad():
        for x in xs:
            y = rows(layer(x)).double()
            y = y - bias if bias is not None else y
            idx = _sample(y.shape[0], per_item, gen) if settings.relu else None
            ys.append(y if idx is None else y[idx])
    factors = fit_response_svd(weight.to(torch.float64), bias, torch.cat(ys), ranks[0], spec.groups,
                               relu=settings.relu, iters=settings.iters, ridge=settings.ridge)
    return method.build(spec, ranks, factors, dtype=weight.dtype, device=weight.device)

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

Two safeguards (issue 14), so a response fit is never worse than the weight-only one:

* **Exact at full rank, anchored below it.**  At the method's full rank the weight-only
  factorization is already exact, and it is returned as is: a response fit there can only lose the
  directions the calibration inputs do not span (ResNet-18's expanding 1x1 downsample convs,
  ``C < N``, fitted on fewer positions than channels, had relative output error 0.07-0.18 on
  held-out inputs and 1e-11 on the calibration set).  Below the full rank both fits are
  *anchored* to the weights: the closed form ranks the directions by ``Y^T Y + a W W^T`` (``a`` =
  ``ridge`` times the ratio of their traces), and the least squares solve for a correction to the
  weight-only last piece, ``w = w0 + argmin ||A d - (Y - A w0)||^2 + ridge ||d||^2``, so directions
  the data leaves undetermined keep the weight-only solution instead of being zeroed.
* **A held-out check.**  ``holdout`` (default 0.2) of the calibration samples (the last ones; with
  a single sample, the end of its longest spatial axis, a crop) are held out, the response fit is
  fitted on the rest, and both it and the weight-only fit are scored on the held-out part.  When the
  response fit is worse there, the weight-only fit is returned, with a note saying so in its
  ``fit_note`` attribute (:func:`fit_note`) and a :class:`DataAwareFallbackWarning`.  Otherwise the
  response fit is refitted on all the samples.  The same split chooses the ridge of the closed form
  and of the refit: ``ridge`` and the larger :data:`RIDGES` are tried, weight-only being the
  infinite one (few positions per unknown over-fit at ``ridge=1e-8``); a ``uses_calibration``
  method is only checked, its own options stay.  Tucker-2 at ``macs_ratio=0.5`` on a random-init float64
  ResNet-18, one 64 x 64 calibration image: model output error on 4 other images 2.48 before
  these safeguards, 0.51 with them, 0.97 weight-only (0.37 / 0.41 / 0.97 with four images; every
  layer's own held-out error is at or below what it was).

Settings (:class:`DataAwareSettings`; given to ``factorize(..., calibration=X, ...)`` or as rule
keys next to ``data_aware: true``): ``relu`` (bool), ``alternate`` (int), ``iters`` (ReLU steps,
default 25), ``ridge`` (relative Tikhonov term, default 1e-8), ``max_positions`` (rows sampled for
the least squares and the ReLU fit, default 16384), ``seed`` (of that sampling), ``holdout``
(fraction held out for the check above, 0 = no check).  A method with ``uses_calibration``
(``lowrank_sparse``) is handed the inputs and fits the linear responses itself.
TT is not supported (its module is not a chain of convs).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..spec.convspec import ConvSpec, UnsupportedLayer, is_conv
from ..spec.im2col import patches
from .base import Factorized, Method, Ranks
from .channel_svd import ChannelSVD

__all__ = ["DataAwareSettings", "factorize_data_aware", "prepare_inputs", "rows", "fit_response_svd",
           "refit_last", "relu_z_step", "lam_schedule", "split_holdout", "fit_note", "FIT_NOTE",
           "DataAwareFallbackWarning"]

#: the attribute of a replacement module holding the note of a data-aware fallback (see :func:`fit_note`)
FIT_NOTE = "fit_note"


class DataAwareFallbackWarning(UserWarning):
    """A response fit was worse than the weight-only fit on held-out calibration inputs, which was kept."""


def fit_note(module: nn.Module) -> str | None:
    """What data-aware fitting has to say about the replacement it returned, or None: e.g. that the
    response fit was worse than the weight-only one on held-out inputs, so the weight-only fit was kept."""
    return getattr(module, FIT_NOTE, None)


@dataclass(frozen=True)
class DataAwareSettings:
    """How a layer is fitted to its responses (see the module docstring)."""

    relu: bool | str = "auto"
    alternate: int = 0
    iters: int = 25
    ridge: float = 1e-8
    max_positions: int = 16384
    seed: int = 0
    holdout: float = 0.2
    sequential: bool = True

    def __post_init__(self):
        if self.relu not in (True, False, "auto"):
            raise ValueError(f"relu must be true, false or 'auto', got {self.relu!r}")
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be true or false, got {self.sequential!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (self.alternate, self.iters)):
            raise ValueError(f"alternate and iters must be non-negative ints, got {self.alternate!r}, {self.iters!r}")
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge!r}")
        if not (isinstance(self.max_positions, int) and self.max_positions >= 1):
            raise ValueError(f"max_positions must be a positive int, got {self.max_positions!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be a number in [0, 1), got {self.holdout!r}")

    def resolved(self, followed_by_relu: bool = False) -> "DataAwareSettings":
        """These settings with ``relu="auto"`` decided: True when the layer's output only feeds a ReLU."""
        return dataclasses.replace(self, relu=followed_by_relu) if self.relu == "auto" else self


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


def _anchored(cov: torch.Tensor, w: torch.Tensor, ridge: float) -> torch.Tensor:
    """``cov + a W W^T`` with ``a = ridge tr(cov) / tr(W W^T)``: directions the responses leave at (near)
    zero variance are ranked by the weight, as the weight-only SVD ranks them.  ``cov: (n, n)``, ``w: (n, q)``."""
    wwt = w @ w.T
    scale = wwt.trace()
    if not scale > 0 or not ridge > 0:
        return cov
    return cov + (ridge * cov.trace().clamp_min(0) / scale) * wwt


def fit_response_svd(weight: torch.Tensor, bias: torch.Tensor | None, responses: torch.Tensor, rank: int,
                     groups: int = 1, *, relu: bool = False, iters: int = 25, ridge: float = 1e-8,
                     targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Zhang et al.'s response reconstruction for a rank-``rank`` channel SVD.

    ``weight: (N, C/g, *k)``, ``bias: (N,)`` or None, ``responses: (P, N)`` = ``W * x_hat`` at P sampled
    positions (no bias), on the inputs the layer will receive.  ``targets: (P, N)`` = ``W * x`` on the
    original network's inputs at the same positions (asymmetric reconstruction, Zhang et al. TPAMI 2016
    sec. 3.3: ``min ||y - M y_hat||``, M of rank r, by reduced-rank regression); None: the same as
    ``responses`` (``M = U_r U_r^T``).  Returns channel_svd factors ``first: (g r, C/g, *k)``,
    ``second: (N, r)`` and ``bias`` (when the layer has one).  The fitted values' covariance is
    anchored to ``M W (M W)^T`` by ``ridge`` (see :func:`_anchored`).
    """
    n_out = weight.shape[0]
    n = n_out // groups
    firsts, seconds, biases = [], [], []
    for j in range(groups):
        cut = slice(j * n, (j + 1) * n)
        w = weight[cut].reshape(n, -1)
        y_in = responses[:, cut]
        y_t = targets[:, cut] if targets is not None else y_in
        b = bias[cut] if bias is not None else None
        left, right, b_hat = _response_projection(y_in, y_t, w, b, rank, ridge)
        if relu:
            left, right, b_hat = _relu_fit(y_in, y_t, b, left, right, b_hat, rank, iters, ridge)
        firsts.append(right @ w)
        seconds.append(left)
        if b_hat is not None:
            biases.append(b_hat)
    k = weight.shape[1:]
    factors = {"first": torch.cat(firsts).reshape(groups * rank, *k), "second": torch.cat(seconds)}
    if bias is not None:
        factors["bias"] = torch.cat(biases)
    return factors


def _response_projection(y_in, y_t, w, b, rank: int, ridge: float):
    """``(left (n, r), right (r, n), b_hat)`` with ``left @ right @ y_in + b_hat`` the best rank-r linear
    predictor of ``y_t + b`` (``y_in, y_t: (P, n)``).  Symmetric (``y_t is y_in``): the top eigenvectors
    of the response covariance, ``right = left^T``; else reduced-rank regression through the ridge
    regression ``M`` (anchored at the identity) of the centred targets on the centred inputs."""
    mu_in = y_in.mean(0) if b is not None else torch.zeros_like(y_in[0])
    yc = y_in - mu_in
    if y_t is y_in:
        u = _top_eigvecs(_anchored(yc.T @ yc, w, ridge), rank)
        return u, u.T, (b + mu_in - u @ (u.T @ mu_in) if b is not None else None)
    mu_t = y_t.mean(0) if b is not None else torch.zeros_like(y_t[0])
    eye = torch.eye(yc.shape[1], dtype=yc.dtype, device=yc.device)
    m = (eye + _solve(yc, (y_t - mu_t) - yc, ridge)).T                # (n, n): y_t - mu_t ~ m (y_in - mu_in)
    fitted = yc @ m.T
    u = _top_eigvecs(_anchored(fitted.T @ fitted, m @ w, ridge), rank)
    right = u.T @ m
    return u, right, (b + mu_t - u @ (right @ mu_in) if b is not None else None)


def _relu_fit(y_in, y_t, b, left, right, b_hat, rank, iters, ridge):
    """Zhang et al. 2016 sec. 3.2-3.3: ``min ||r(y_t + b) - r(M y_in + b_hat)||``, ``M = left @ right`` of rank r
    (``y_t is y_in``: the symmetric case)."""
    target = (y_t + b if b is not None else y_t).clamp(min=0)
    has_bias = b is not None

    def predict(left, right, b_hat):
        return y_in @ (left @ right).T + (b_hat if has_bias else 0)

    y_hat = predict(left, right, b_hat)
    best = ((target - y_hat.clamp(min=0)).pow(2).sum().item(), left, right, b_hat)
    ybar = y_in.mean(0) if has_bias else torch.zeros_like(y_in[0])
    yc = y_in - ybar
    solve = _RidgeLS(yc, ridge)
    cov = yc.T @ yc
    for lam in lam_schedule(iters):
        z = relu_z_step(target, y_hat, lam)
        zbar = z.mean(0) if has_bias else torch.zeros_like(z[0])
        m_ls = solve(z - zbar).T                                          # (n, n): z ~ m_ls y_in
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


def conv_params(conv: nn.Module, dtype=torch.float64) -> torch.Tensor:
    """The weight (and bias) of ``conv`` as per-group least-squares unknowns ``(g, q [+1], N/g)``, the
    layout :func:`_fit_conv` solves for (``q = C/g * prod(kernel)``)."""
    spec = ConvSpec.from_module(conv)
    params = conv.weight.detach().to(dtype).reshape(spec.groups, spec.out_per_group, -1).mT.clone()   # a copy
    if conv.bias is not None:
        params = torch.cat([params, conv.bias.detach().to(dtype).reshape(spec.groups, 1, -1)], 1)
    return params


def _fit_conv(conv: nn.Module, design: torch.Tensor, target: torch.Tensor, ridge: float,
              solvers: list[_RidgeLS] | None = None, anchor: torch.Tensor | None = None) -> None:
    """Least-squares weight (and bias) of ``conv`` from ``design: (P, g, q)`` to ``target: (P, N)``,
    anchored: ``anchor + argmin_d ||A d - (target - A anchor)||^2 + ridge ||d||^2``, so directions the
    design does not span keep ``anchor`` (``(g, q [+1], N/g)``, default the conv's current parameters)."""
    spec = ConvSpec.from_module(conv)
    g, n = spec.groups, spec.out_per_group
    solvers = solvers or _conv_solvers(conv, design, ridge)
    anchor = conv_params(conv, design.dtype) if anchor is None else anchor
    weights, biases = [], []
    for j in range(g):
        start = anchor[j]                                              # (q [+1], n)
        sol = start + solvers[j](target[:, j * n:(j + 1) * n] - solvers[j].a @ start)
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
               settings: DataAwareSettings = DataAwareSettings(), targets: Sequence[torch.Tensor] | None = None
               ) -> Factorized:
    """Re-solve the last conv/Linear of ``module`` so that ``module(xs)`` reproduces ``layer`` on ``xs``
    (or, asymmetrically, on ``targets``: the original network's inputs, shaped like ``xs``), in place.

    The modules run in their own dtype; the least squares are solved in float64, anchored at the
    last piece's current weights (see :func:`_fit_conv`).  With ``settings.alternate`` and a
    two-piece chain ending in a pointwise conv, the first piece is re-solved too (alternately).
    """
    settings = settings.resolved()
    return _LastPieceFit(module, layer, xs, xs if targets is None else targets, settings)(settings.ridge)


class _LastPieceFit:
    """Refitting the last piece of ``module`` on ``xs`` (responses: ``layer`` on ``ts``) as a problem
    solvable for several ridges: the rows are sampled once, each call starts again from the module's
    pieces as given."""

    def __init__(self, module: Factorized, layer: nn.Module, xs: Sequence[torch.Tensor], ts: Sequence[torch.Tensor],
                 settings: DataAwareSettings):
        pieces = list(module)
        pre, self.last = _split_piece(pieces[-1])
        prefix = nn.Sequential(*pieces[:-1], *pre)
        self.first = (_alternating_first(pieces, pre, ConvSpec.from_module(self.last))
                      if settings.alternate > 0 else None)
        with torch.no_grad():
            _check_is_chain(module, prefix, self.last, xs[0][:2])
            self.design, self.target, self.first_rows = _sampled_rows(layer, prefix, self.last, self.first, xs,
                                                                      ts, settings)
        self.module, self.settings = module, settings
        self.anchor = conv_params(self.last)     # the weight-only last piece: what undetermined directions keep
        self.first_start = self.first[1].weight.detach().clone() if self.first is not None else None

    def __call__(self, ridge: float) -> Factorized:
        """The module with its last piece (and, alternating, its first) solved at ``ridge``."""
        if self.first is not None:
            with torch.no_grad():
                self.first[1].weight.copy_(self.first_start)
        if self.settings.relu:
            _relu_refit(self.last, self.design, self.target, self.settings.iters, ridge, self.anchor)
            return self.module
        _fit_conv(self.last, self.design, self.target, ridge, anchor=self.anchor)
        if self.first is not None:
            _alternate(self.first[1], self.last, self.first_rows, self.target, self.settings.alternate, ridge,
                       self.anchor)
        return self.module


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


def _sampled_rows(layer, prefix, last, first_piece, xs, ts, settings: DataAwareSettings):
    """Sampled im2col rows of the last piece's input ``(P, g, q)`` on ``xs``, the layer's responses to
    ``ts`` ``(P, N)`` and,
    with ``first_piece`` (``(modules before it, the first conv)``, when alternating) that conv's input
    rows ``(P, C k)``; all float64."""
    last_spec = ConvSpec.from_module(last)
    gen = torch.Generator().manual_seed(settings.seed)
    per_item = max(1, settings.max_positions // len(xs))
    designs, targets, firsts = [], [], []
    for x, x_t in zip(xs, ts):
        d = patches(prefix(x), last_spec).double()
        t = rows(layer(x_t)).double()
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


def _alternate(first: nn.Module, last: nn.Module, xp: torch.Tensor, target: torch.Tensor, steps: int, ridge: float,
               anchor: torch.Tensor) -> None:
    """Alternately re-solve ``first`` (unconstrained map projected on ``last``) and ``last`` (least squares,
    anchored at ``anchor``); the unconstrained map is anchored at the chain's current one."""
    last_spec = ConvSpec.from_module(last)
    solve_x = _RidgeLS(xp, ridge)
    for _ in range(steps):
        w2 = last.weight.double().reshape(last_spec.out_channels, -1)       # (N, r)
        w1 = first.weight.double().reshape(w2.shape[1], -1)                 # (r, Ck)
        resid = target - (last.bias.double() if last.bias is not None else 0)
        # min ||resid - xp W1^T W2^T||: W1 = W2^+ (resid^T xp) (xp^T xp)^-1
        current = (w2 @ w1).T                                                # (Ck, N)
        coef = current + solve_x(resid - xp @ current)                       # (Ck, N): unconstrained map
        w1 = torch.linalg.lstsq(w2, coef.T).solution                         # (r, Ck)
        with torch.no_grad():
            first.weight.copy_(w1.reshape(first.weight.shape))
        _fit_conv(last, patches(_rows_to_conv_input(xp @ w1.T, last_spec), last_spec), target, ridge, anchor=anchor)


def _rows_to_conv_input(z: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Rows ``(P, r)`` as a batch a pointwise conv / Linear of ``spec`` accepts."""
    return z if spec.is_linear else z.reshape(z.shape[0], z.shape[1], *([1] * spec.dim))


def _relu_refit(last: nn.Module, design: torch.Tensor, target_pre: torch.Tensor, iters: int, ridge: float,
                anchor: torch.Tensor) -> None:
    """Zhang et al.'s alternation for the last piece: ``min ||r(y) - r(last(design))||`` (each least
    squares anchored at ``anchor``)."""
    target = target_pre.clamp(min=0)
    solvers = _conv_solvers(last, design, ridge)
    _fit_conv(last, design, target_pre, ridge, solvers, anchor)

    def objective():
        return (target - _conv_rows(last, design).clamp(min=0)).pow(2).sum().item()

    best = (objective(), last.weight.detach().clone(), None if last.bias is None else last.bias.detach().clone())
    for lam in lam_schedule(iters):
        z = relu_z_step(target, _conv_rows(last, design), lam)
        _fit_conv(last, design, z, ridge, solvers, anchor)
        value = objective()
        if value < best[0]:
            best = (value, last.weight.detach().clone(), None if last.bias is None else last.bias.detach().clone())
    with torch.no_grad():
        last.weight.copy_(best[1])
        if last.bias is not None:
            last.bias.copy_(best[2])


# ---------------------------------------------------------------------------- entry point (compression/api.py)
def factorize_data_aware(layer: nn.Module, method: Method, spec: ConvSpec, ranks: Ranks, calibration,
                         settings: DataAwareSettings = DataAwareSettings(), targets=None) -> Factorized:
    """:func:`convfactor.factorize` with ``calibration=X`` (the layer's inputs, a tensor or a list).

    ``targets``: the inputs the *original* network gives the layer, aligned with ``calibration`` (same
    samples, same shapes), when ``calibration`` holds what the already-compressed layers before it
    produce: the fit then reproduces the original responses from the inputs the layer will really
    receive (asymmetric, Zhang et al. TPAMI 2016 sec. 3.3).  None: the responses to ``calibration``.

    At the full rank: the (exact) weight-only factorization, unless ``targets`` differ (then there is
    upstream error to absorb).  Below it: the response fit, its ridge chosen on the held-out part of
    ``X`` (``settings.holdout``, :func:`_choose_ridge`), unless even the best one is worse there than
    the weight-only fit; then the weight-only fit, with a note (:func:`fit_note`) and a
    :class:`DataAwareFallbackWarning`.  ``relu="auto"`` is False here (:func:`convfactor.compress`
    resolves it from the model's graph).
    """
    if spec.transposed:        # the closed forms and the refit read the weight as (N, C/g, *k)
        raise UnsupportedLayer("data-aware fitting: ConvTranspose is not supported (fit it weight-only)")
    settings = settings.resolved()
    weight = layer.weight.detach()
    xs = prepare_inputs(calibration, spec, device=weight.device, dtype=weight.dtype)   # convs run in the layer's dtype
    ts = xs if targets is None else _aligned(prepare_inputs(targets, spec, device=weight.device, dtype=weight.dtype), xs)
    if settings.relu and method.uses_calibration:
        raise ValueError(f"{method.name}: relu=True is not supported (the method fits linear responses itself)")
    weight_only = _weight_only(layer, method, spec, ranks)
    if ts is xs and all(r >= f for r, f in zip(ranks, method.full_rank(spec))):
        return weight_only                                   # exact: nothing for the data to improve
    train, held = split_holdout(xs, spec, settings.holdout)
    train_t, held_t = (train, held) if ts is xs else split_holdout(ts, spec, settings.holdout)
    ridge = settings.ridge
    if held:
        fitter = _response_fitter(layer, method, spec, ranks, train, train_t, settings, weight_only)
        ridge, errors = _choose_ridge(fitter, weight_only, layer, (held, held_t), settings)
        if ridge is None:
            note = (f"data-aware fit kept the weight-only factors: its relative output error on held-out "
                    f"calibration inputs was {errors[0]:.4g}, the weight-only fit's {errors[1]:.4g}")
            setattr(weight_only, FIT_NOTE, note)
            warnings.warn(note, DataAwareFallbackWarning, stacklevel=2)
            return weight_only
    return _response_fitter(layer, method, spec, ranks, xs, ts, settings, weight_only)(ridge)


def _aligned(ts: list[torch.Tensor], xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``ts`` when each of its batches has the shape of the matching batch of ``xs``; else a ValueError."""
    if [t.shape for t in ts] != [x.shape for x in xs]:
        raise ValueError(f"targets must match calibration batch by batch, got shapes {[tuple(t.shape) for t in ts]} "
                         f"and {[tuple(x.shape) for x in xs]}")
    return ts


#: ridges (relative Tikhonov terms) tried above ``settings.ridge`` by the held-out check
RIDGES = (1e-4, 1e-2, 1e-1, 1.0)


def _choose_ridge(fitter, weight_only: Factorized, layer: nn.Module, held: tuple[list, list],
                  settings: DataAwareSettings) -> tuple[float | None, tuple[float, float]]:
    """The ridge whose fit (``fitter(ridge)``, fitted without ``held``) does best on ``held``, or None when
    even that one is worse there than ``weight_only`` (the infinite ridge); and ``(its error, the
    weight-only error)``.  ``held``: (inputs, the original network's inputs).  Ridges go up from ``settings.ridge``; a larger one must lower the held-out
    error by 1% to be taken, so ample data keeps the documented ridge."""
    candidates = [settings.ridge] + ([r for r in RIDGES if r > settings.ridge] if fitter.tunable else [])
    best, best_error = None, math.inf
    for ridge in candidates:
        error = _relative_output_error(fitter(ridge), layer, *held, settings.relu)
        if best is None or error < 0.99 * best_error:
            best, best_error = ridge, error
    weight_error = _relative_output_error(weight_only, layer, *held, settings.relu)
    return (None if best_error > weight_error else best), (best_error, weight_error)


def _weight_only(layer: nn.Module, method: Method, spec: ConvSpec, ranks: Ranks) -> Factorized:
    """The weight-only replacement of ``layer`` (factorized in float64, built in the layer's dtype)."""
    weight = layer.weight.detach()
    factors = method.factorize(weight.to(torch.float64), spec, ranks)
    if layer.bias is not None:
        factors["bias"] = layer.bias.detach().double()
    return method.build(spec, ranks, factors, dtype=weight.dtype, device=weight.device)


class _Fitter:
    """``fitter(ridge) -> module``: a response fit on fixed inputs for any ridge; ``tunable`` says whether
    the ridge changes anything."""

    def __init__(self, fit, tunable: bool):
        self.fit, self.tunable = fit, tunable

    def __call__(self, ridge: float) -> Factorized:
        return self.fit(ridge)


def _response_fitter(layer, method: Method, spec: ConvSpec, ranks: Ranks, xs: list[torch.Tensor],
                     ts: list[torch.Tensor], settings: DataAwareSettings, weight_only: Factorized) -> _Fitter:
    """The response fit on inputs ``xs`` to ``layer``'s responses to ``ts``: by the method itself (its own
    options, on ``xs`` only; the ridge is not used), by Zhang et al.'s closed form, or by refitting the
    last piece of (a copy of) ``weight_only``."""
    if method.uses_calibration:
        return _Fitter(lambda ridge: _fit_by_method(layer, method, spec, ranks, xs, settings), tunable=False)
    if isinstance(method, ChannelSVD) and type(method).factorize is ChannelSVD.factorize:
        return _Fitter(_channel_svd_fitter(layer, method, spec, ranks, xs, ts, settings), tunable=True)
    return _Fitter(_LastPieceFit(copy.deepcopy(weight_only), layer, xs, ts, settings), tunable=True)


@torch.no_grad()
def _relative_output_error(module: nn.Module, layer: nn.Module, xs: Sequence[torch.Tensor],
                           ts: Sequence[torch.Tensor], relu: bool) -> float:
    """``||f(module(x)) - f(layer(t))|| / ||f(layer(t))||`` over the batches ``xs`` and their originals
    ``ts`` (``f``: ReLU when ``relu``)."""
    num = den = 0.0
    for x, t in zip(xs, ts):
        y, y_hat = layer(t).double(), module(x).double()
        if relu:
            y, y_hat = y.clamp(min=0), y_hat.clamp(min=0)
        num += float((y_hat - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def split_holdout(xs: Sequence[torch.Tensor], spec: ConvSpec, fraction: float
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(train, held_out)`` batches: the last ``fraction`` of the samples (rows for a Linear), at least
    one and never all.  A single conv sample is cut along its longest spatial axis instead, when both
    crops still cover the kernel.  ``held_out`` is empty when ``fraction`` is 0 or nothing can be held out."""
    total = sum(x.shape[0] for x in xs)
    if fraction <= 0:
        return list(xs), []
    if total < 2:
        return _spatial_holdout(xs[0], spec, fraction) if not spec.is_linear else (list(xs), [])
    keep = total - min(total - 1, max(1, round(fraction * total)))
    train, held, seen = [], [], 0
    for x in xs:
        cut = min(max(keep - seen, 0), x.shape[0])
        train += [x[:cut]] if cut else []
        held += [x[cut:]] if cut < x.shape[0] else []
        seen += x.shape[0]
    return train, held


def _spatial_holdout(x: torch.Tensor, spec: ConvSpec, fraction: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One sample ``(1, C, *S)`` cut along its longest spatial axis into ``1 - fraction`` and ``fraction``
    crops (each wide enough for one output position, and wider than the padding unless it is zeros),
    or ``([x], [])`` when it is too small."""
    axis = max(range(spec.dim), key=lambda a: x.shape[2 + a])
    size = x.shape[2 + axis]
    k, d, pad = spec.kernel_size[axis], spec.dilation[axis], spec.padding[axis]
    need = max(1, d * (k - 1) + 1 - sum(pad))
    if spec.padding_mode != "zeros":                       # reflect / circular need pad < crop width
        need = max(need, max(pad) + 1)
    held = max(need, round(fraction * size))
    if size - held < need:
        return [x], []
    return [x.narrow(2 + axis, 0, size - held)], [x.narrow(2 + axis, size - held, held)]


def _fit_by_method(layer, method: Method, spec: ConvSpec, ranks: Ranks, xs, settings) -> Factorized:
    """A method that fits the (linear) responses itself is handed the inputs (statistics in float64)."""
    if settings.relu:
        raise ValueError(f"{method.name}: relu=True is not supported (the method fits linear responses itself)")
    weight = layer.weight.detach()
    factors = method.factorize(weight.to(torch.float64), spec, ranks, calibration=xs)
    if layer.bias is not None:
        factors.setdefault("bias", layer.bias.detach().double())
    return method.build(spec, ranks, factors, dtype=weight.dtype, device=weight.device)


def _channel_svd_fitter(layer, method: ChannelSVD, spec: ConvSpec, ranks: Ranks, xs, ts, settings):
    """Zhang et al.'s closed form on the layer's responses to ``xs`` (and, asymmetric, to ``ts``; sampled
    positions for the ReLU fit and the asymmetric one), as a function of the ridge; the responses are
    computed once."""
    weight = layer.weight.detach()
    bias = layer.bias.detach().double() if layer.bias is not None else None
    gen = torch.Generator().manual_seed(settings.seed)
    per_item = max(1, settings.max_positions // len(xs))
    asymmetric = ts is not xs
    ys, yts = [], []
    with torch.no_grad():
        for x, t in zip(xs, ts):
            y = rows(layer(x)).double()
            y = y - bias if bias is not None else y
            idx = _sample(y.shape[0], per_item, gen) if settings.relu or asymmetric else None
            ys.append(y if idx is None else y[idx])
            if asymmetric:
                y_t = rows(layer(t)).double()
                y_t = y_t - bias if bias is not None else y_t
                yts.append(y_t if idx is None else y_t[idx])
    responses = torch.cat(ys)
    targets = torch.cat(yts) if asymmetric else None

    def fit(ridge: float) -> Factorized:
        factors = fit_response_svd(weight.to(torch.float64), bias, responses, ranks[0], spec.groups,
                                   relu=settings.relu, iters=settings.iters, ridge=ridge, targets=targets)
        return method.build(spec, ranks, factors, dtype=weight.dtype, device=weight.device)
    return fit

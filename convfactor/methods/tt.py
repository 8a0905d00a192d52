"""Tensor-train (TT) fully-connected layers: Novikov et al., "Tensorizing Neural Networks", NeurIPS 2015,
with the TT-SVD algorithm of Oseledets, "Tensor-Train Decomposition", SISC 2011 (Alg. 1).

A weight ``W: (M, N)`` with ``M = m_1 ... m_d`` outputs and ``N = n_1 ... n_d`` inputs is a *TT-matrix*
(Novikov sec. 3)::

    W[(i_1..i_d), (j_1..j_d)] = G_1[i_1, j_1] G_2[i_2, j_2] ... G_d[i_d, j_d]

with cores ``G_k: (r_{k-1}, m_k, n_k, r_k)``, ``r_0 = r_d = 1``.  TT-SVD reshapes ``W`` to the d-way
tensor with modes ``m_k n_k`` and peels one mode at a time with a truncated SVD.  It is exact when each
``r_k`` equals the rank of the k-th unfolding, at most ``min(prod_{i<=k} m_i n_i, prod_{i>k} m_i n_i)``
(:meth:`TT.full_rank`); the untruncated sweep's singular values at step k are exactly those of the
k-th unfolding, which is what an ``energy`` target is measured on.

:class:`TTLinear` computes ``y = W x + b`` by d successive contractions (Novikov sec. 4), never
forming ``W``.  It also replaces a 1x1 ``Conv1d/2d/3d`` (groups=1; stride and padding of any mode
are applied to the input first).  ``options``: ``in_modes`` / ``out_modes`` (lists of equal length
whose products are the in/out features) or ``d`` (number of cores for an automatic balanced
factorization, default :func:`default_d`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..spec.convspec import ConvSpec, UnsupportedLayer
from .base import Cost, Factorized, Method, Ranks
from .linalg import svd_flops

__all__ = ["TT", "TTLinear", "balanced_modes", "default_d", "tt_svd", "tt_full", "tt_full_ranks", "tt_macs",
           "runs_reversed"]


# ---------------------------------------------------------------------------- mode arithmetic
def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def balanced_modes(n: int, d: int) -> list[int]:
    """``d`` factors of ``n`` as equal as possible (largest prime first onto the smallest slot), descending."""
    if n < 1 or d < 1:
        raise ValueError(f"cannot split {n} into {d} modes")
    slots = [1] * d
    for p in sorted(_prime_factors(n), reverse=True):
        i = min(range(d), key=lambda k: slots[k])
        slots[i] *= p
    return sorted(slots, reverse=True)


def default_d(in_features: int, out_features: int) -> int:
    """Cores so that modes are about 8 wide (VGG's 25088x4096 gets 5, 4096x4096 gets 4)."""
    return max(2, round(math.log(max(in_features, out_features, 2)) / math.log(8)))


def resolve_modes(spec: ConvSpec, in_modes=None, out_modes=None, d=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``(in_modes, out_modes)`` for a layer: given, or balanced with ``d`` cores."""
    n_in, n_out = spec.in_channels, spec.out_channels
    if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 2):
        raise ValueError(f"tt: d must be an int >= 2, got {d!r}")
    if in_modes is None and out_modes is None:
        d = d or default_d(n_in, n_out)
    else:
        given = in_modes if in_modes is not None else out_modes
        d = len(given)
    in_modes = tuple(balanced_modes(n_in, d)) if in_modes is None else tuple(int(m) for m in in_modes)
    out_modes = tuple(balanced_modes(n_out, d)) if out_modes is None else tuple(int(m) for m in out_modes)
    if len(in_modes) != len(out_modes) or len(in_modes) < 2:
        raise ValueError(f"tt: in_modes {in_modes} and out_modes {out_modes} need the same length >= 2")
    if any(m < 1 for m in in_modes + out_modes):
        raise ValueError(f"tt: modes must be positive, got {in_modes}, {out_modes}")
    if math.prod(in_modes) != n_in:
        raise ValueError(f"tt: in_modes {in_modes} multiply to {math.prod(in_modes)}, not in_features={n_in}")
    if math.prod(out_modes) != n_out:
        raise ValueError(f"tt: out_modes {out_modes} multiply to {math.prod(out_modes)}, not out_features={n_out}")
    return in_modes, out_modes


def tt_full_ranks(in_modes: Sequence[int], out_modes: Sequence[int]) -> tuple[int, ...]:
    """Largest useful TT-ranks: ``min(prod_{i<=k} m_i n_i, prod_{i>k} m_i n_i)`` for k = 1..d-1."""
    sizes = [m * n for m, n in zip(out_modes, in_modes)]
    return tuple(min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes)))


# ---------------------------------------------------------------------------- the math
def _tt_tensor(weight: torch.Tensor, in_modes, out_modes) -> torch.Tensor:
    """``weight: (M, N)`` -> ``(m_1 n_1, ..., m_d n_d)``."""
    d = len(in_modes)
    t = weight.reshape(*out_modes, *in_modes)
    order = [i for k in range(d) for i in (k, d + k)]
    return t.permute(order).reshape([m * n for m, n in zip(out_modes, in_modes)])


def tt_svd(weight: torch.Tensor, in_modes, out_modes, ranks: Sequence[int] | None = None,
           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """TT-SVD (Oseledets 2011, Alg. 1) of ``weight: (M, N)``.

    Returns cores ``G_k: (r_{k-1}, m_k, n_k, r_k)`` and, per bond, the singular values of that
    sweep step (all of them; with ``ranks=None`` nothing is truncated).
    """
    d = len(in_modes)
    sizes = [m * n for m, n in zip(out_modes, in_modes)]
    c = _tt_tensor(weight, in_modes, out_modes).reshape(sizes[0], -1)
    cores, spectra, r_prev = [], [], 1
    for k in range(d - 1):
        c = c.reshape(r_prev * sizes[k], -1)
        u, s, vh = torch.linalg.svd(c, full_matrices=False)
        spectra.append(s)
        r = s.numel() if ranks is None else min(int(ranks[k]), s.numel())
        cores.append(u[:, :r].reshape(r_prev, out_modes[k], in_modes[k], r))
        c = s[:r, None] * vh[:r]
        r_prev = r
    cores.append(c.reshape(r_prev, out_modes[-1], in_modes[-1], 1))
    return cores, spectra


def tt_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The dense ``(M, N)`` matrix of a TT-matrix (for errors and tests only)."""
    out = cores[0]                                      # (1, m_1, n_1, r_1)
    for g in cores[1:]:
        r0, m, n, r1 = g.shape
        out = torch.einsum("aijr,rmns->aimjns", out, g)
        out = out.reshape(1, out.shape[1] * m, out.shape[3] * n, r1)
    return out[0, :, :, 0]


def _step_shapes(in_modes, out_modes, ranks):
    """Per contraction step k: (rows, inner, outer) of the matmul ``(rows, inner) @ (inner, outer)``."""
    d = len(in_modes)
    full = (1, *ranks, 1)
    steps = []
    for k in range(d):
        done_out = math.prod(out_modes[:k])
        rest_in = math.prod(in_modes[k + 1:])
        steps.append((done_out * rest_in, full[k] * in_modes[k], out_modes[k] * full[k + 1]))
    return steps


def _sweep_macs(in_modes, out_modes, ranks) -> int:
    return sum(a * b * c for a, b, c in _step_shapes(in_modes, out_modes, ranks))


def runs_reversed(in_modes, out_modes, ranks) -> bool:
    """Whether contracting from the last core is cheaper (a TT-matrix read backwards is a TT-matrix
    with the modes reversed and each core's rank axes swapped)."""
    return _sweep_macs(in_modes[::-1], out_modes[::-1], tuple(ranks)[::-1]) < _sweep_macs(in_modes, out_modes, ranks)


def tt_macs(in_modes, out_modes, ranks) -> int:
    """MACs of one :class:`TTLinear` forward for one input vector (in the cheaper direction)."""
    return min(_sweep_macs(in_modes, out_modes, ranks),
               _sweep_macs(in_modes[::-1], out_modes[::-1], tuple(ranks)[::-1]))


# ---------------------------------------------------------------------------- the module
class TTLinear(nn.Module):
    """``y = W x + b`` with ``W`` a TT-matrix, by successive contractions (Novikov et al. 2015, sec. 4).

    The cores are contracted one at a time, from the first or, when cheaper (:func:`runs_reversed`),
    from the last.  Step k of that sweep stores its core as the parameter ``core{k}: (r n_k, m_k r')``,
    the matrix its contraction uses.  ``x: (..., N)`` -> ``(..., M)``; with ``channel_dim=1`` it is a
    1x1 conv instead (``x: (B, N, *spatial)``), after ``pad`` (F.pad order, ``pad_mode``) and ``stride``.
    """

    def __init__(self, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], bias: bool = True,
                 *, channel_dim: int | None = None, stride: Sequence[int] = (), pad: Sequence[int] = (),
                 pad_mode: str = "zeros", dtype=None, device=None):
        super().__init__()
        self.in_modes = tuple(int(m) for m in in_modes)
        self.out_modes = tuple(int(m) for m in out_modes)
        self.ranks = tuple(int(r) for r in ranks)
        self.channel_dim = channel_dim
        self.stride = tuple(int(s) for s in stride)
        self.pad = tuple(int(p) for p in pad)
        self.pad_mode = pad_mode
        self.reverse = runs_reversed(self.in_modes, self.out_modes, self.ranks)
        sweep = -1 if self.reverse else 1
        # the sweep's modes and ranks
        self._in, self._out, self._ranks = self.in_modes[::sweep], self.out_modes[::sweep], self.ranks[::sweep]
        full = (1, *self._ranks, 1)
        for k, (m, n) in enumerate(zip(self._out, self._in)):    # plain attributes: a leaf module
            core = nn.Parameter(torch.empty(full[k] * n, m * full[k + 1], dtype=dtype, device=device))
            nn.init.normal_(core, std=core.shape[0] ** -0.5)
            self.register_parameter(f"core{k}", core)
        self.bias = nn.Parameter(torch.zeros(math.prod(self.out_modes), dtype=dtype, device=device)) if bias else None

    @property
    def cores(self) -> list[nn.Parameter]:
        """The stored core matrices, in sweep order."""
        return [getattr(self, f"core{k}") for k in range(len(self.in_modes))]

    def set_cores(self, cores: Sequence[torch.Tensor]) -> None:
        """Copy cores ``G_k: (r_{k-1}, m_k, n_k, r_k)`` (k = 1..d) into the stored matrices."""
        if self.reverse:
            cores = [g.permute(3, 1, 2, 0) for g in reversed(cores)]
        with torch.no_grad():
            for param, g in zip(self.cores, cores):
                r0, m, n, r1 = g.shape
                param.copy_(g.permute(0, 2, 1, 3).reshape(r0 * n, m * r1).to(param.dtype))

    def get_cores(self) -> list[torch.Tensor]:
        """The cores ``G_k: (r_{k-1}, m_k, n_k, r_k)``, k = 1..d."""
        full = (1, *self._ranks, 1)
        cores = [p.reshape(full[k], n, m, full[k + 1]).permute(0, 2, 1, 3)
                 for k, (p, m, n) in enumerate(zip(self.cores, self._out, self._in))]
        return [g.permute(3, 1, 2, 0) for g in reversed(cores)] if self.reverse else cores

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        b = math.prod(lead)
        d = len(self.in_modes)
        full = (1, *self._ranks, 1)
        if self.reverse:       # read the input index backwards
            x = x.reshape(b, *self.in_modes).permute(0, *range(d, 0, -1))
        # state before step k: (B, R, O, r_{k-1}, n_k) with R = n_{k+1}..n_d, O = m_1..m_{k-1} (one copy per step)
        state = x.reshape(b, self._in[0], -1).transpose(1, 2)
        rest, o = math.prod(self._in[1:]), 1
        for k in range(d):
            mat = state.reshape(b * rest * o, full[k] * self._in[k]) @ getattr(self, f"core{k}")
            o *= self._out[k]                                           # rows (B, R, O), cols (m_k, r_k)
            if k + 1 < d:
                nxt = self._in[k + 1]
                rest //= nxt
                state = mat.reshape(b, nxt, rest, o, full[k + 1]).permute(0, 2, 3, 4, 1)
        if self.reverse:
            mat = mat.reshape(b, *self._out).permute(0, *range(d, 0, -1))
        y = mat.reshape(*lead, -1)
        return y + self.bias if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim is None:
            return self._linear(x)
        if any(self.pad):
            x = nn.functional.pad(x, self.pad, mode="constant" if self.pad_mode == "zeros" else self.pad_mode)
        if any(s != 1 for s in self.stride):
            x = x[(slice(None), slice(None), *(slice(None, None, s) for s in self.stride))]
        return self._linear(x.movedim(1, -1)).movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, bias={self.bias is not None}"


# ---------------------------------------------------------------------------- the method
@dataclass(frozen=True)
class TT(Method):
    """``tt``: TT-matrix factorization of ``nn.Linear`` and 1x1 convs.  Ranks: the d-1 TT-ranks.

    Options: ``in_modes`` / ``out_modes`` (equal-length factorizations of the in / out features)
    or ``d`` (number of cores of an automatic balanced factorization; None: :func:`default_d`).
    """

    in_modes: tuple[int, ...] | None = None
    out_modes: tuple[int, ...] | None = None
    d: int | None = None

    name = "tt"
    n_ranks = 0                      # depends on the mode factorization; see expand_rank
    rank_names = ("tt_rank",)
    supports_linear = True
    supported_dims = (1, 2, 3)
    factor_names = ("core*",)        # core0 ... core{d-1}: (r_{k-1}, m_k, n_k, r_k)

    def __post_init__(self):
        for field, modes in (("in_modes", self.in_modes), ("out_modes", self.out_modes)):
            if modes is not None:
                if isinstance(modes, (str, bytes)) or not all(isinstance(m, int) and not isinstance(m, bool)
                                                              for m in modes):
                    raise ValueError(f"tt: {field} must be a list of ints, got {modes!r}")
                object.__setattr__(self, field, tuple(modes))
        if self.d is not None and (not isinstance(self.d, int) or isinstance(self.d, bool) or self.d < 2):
            raise ValueError(f"tt: d must be an int >= 2, got {self.d!r}")

    def modes(self, spec: ConvSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(in_modes, out_modes)`` for ``spec``: as configured, or balanced with ``d`` cores."""
        return resolve_modes(spec, self.in_modes, self.out_modes, self.d)

    def for_layer(self, spec: ConvSpec) -> "TT":
        in_m, out_m = self.modes(spec)
        return dataclasses.replace(self, in_modes=in_m, out_modes=out_m, d=None)

    def check(self, spec: ConvSpec) -> None:
        if not spec.is_linear:
            if spec.dim not in self.supported_dims:
                raise UnsupportedLayer(f"tt: Conv{spec.dim}d is not supported")
            if not spec.is_pointwise:
                raise UnsupportedLayer(f"tt: kernel {spec.kernel_size} is not 1x1 (TT applies to Linear and 1x1 convs)")
            if spec.groups != 1:
                raise UnsupportedLayer(f"tt: groups={spec.groups} is not supported")
        if spec.in_channels < 2 and spec.out_channels < 2:
            raise UnsupportedLayer("tt: a 1x1 weight has nothing to factorize")

    # -- rank arithmetic (mode-aware)
    def full_rank(self, spec: ConvSpec) -> Ranks:
        return tt_full_ranks(*self.modes(spec))

    def expand_rank(self, spec: ConvSpec, rank) -> Ranks:
        top = self.full_rank(spec)
        if isinstance(rank, int) and not isinstance(rank, bool):
            if rank < 1:
                raise ValueError(f"tt: rank must be >= 1, got {rank}")
            return tuple(min(rank, m) for m in top)          # an int is a cap on every TT-rank
        if isinstance(rank, (tuple, list)) and len(rank) == len(top) and all(
                isinstance(r, int) and not isinstance(r, bool) for r in rank):
            return tuple(int(r) for r in rank)
        raise ValueError(f"tt: rank must be an int or a list of {len(top)} TT-ranks (one per bond of the modes "
                         f"{self.modes(spec)}), got {rank!r}")

    def validate_ranks(self, spec: ConvSpec, ranks: Ranks) -> Ranks:
        top = self.full_rank(spec)
        if len(ranks) != len(top):
            raise ValueError(f"tt: {len(top)} TT-ranks expected, got {ranks}")
        for k, (r, m) in enumerate(zip(ranks, top)):
            if r < 1 or r > m:
                raise ValueError(f"tt: TT-rank {k + 1}={r} is out of range [1, {m}] for modes {self.modes(spec)}")
        return tuple(ranks)

    def ranks_for_macs(self, spec: ConvSpec, ratio: float, input_size: Sequence[int] | None = None) -> Ranks:
        """Largest uniform TT-rank cap whose MACs are <= ratio x dense (MACs grow with the cap; the
        ratio is the same at every position, so ``input_size`` does not matter)."""
        top = self.full_rank(spec)
        modes = self.modes(spec)
        per_vector_budget = ratio * spec.in_channels * spec.out_channels
        best, lo, hi = None, 1, max(top)
        while lo <= hi:
            mid = (lo + hi) // 2
            ranks = tuple(min(mid, m) for m in top)
            if tt_macs(*modes, ranks) <= per_vector_budget + 1e-9:
                best, lo = ranks, mid + 1
            else:
                hi = mid - 1
        if best is None:
            smallest = tt_macs(*modes, (1,) * len(top)) / (spec.in_channels * spec.out_channels)
            raise ValueError(f"tt: macs_ratio={ratio} is unreachable; TT-rank 1 already costs {smallest:.3f} of dense")
        return best

    def scaled_ranks(self, spec: ConvSpec, t: float) -> Ranks:
        return tuple(max(1, min(m, math.ceil(t * m))) for m in self.full_rank(spec))

    def factorization_cost(self, spec: ConvSpec, ranks: Ranks) -> float:
        """TT-SVD's d-1 thin SVDs (Oseledets 2011, Alg. 1): step k of the ``(r_{k-1} m_k n_k, prod_{i>k}
        m_i n_i)`` matrix, ``r_{k-1}`` the kept rank of the step before."""
        in_m, out_m = self.modes(spec)
        sizes = [m * n for m, n in zip(out_m, in_m)]
        total, r_prev = 0.0, 1
        for k in range(len(sizes) - 1):
            rows, cols = r_prev * sizes[k], math.prod(sizes[k + 1:])
            total += svd_flops(rows, cols)
            r_prev = min(int(ranks[k]), rows, cols)
        return total

    # -- the four pieces
    def spectra(self, weight: torch.Tensor, spec: ConvSpec) -> list[torch.Tensor]:
        """Singular values of each unfolding (the untruncated TT-SVD sweep), each shaped (1, n)."""
        in_m, out_m = self.modes(spec)
        _, spectra = tt_svd(weight.reshape(spec.out_channels, spec.in_channels).double(), in_m, out_m)
        return [s.unsqueeze(0) for s in spectra]

    def factorize(self, weight: torch.Tensor, spec: ConvSpec, ranks: Ranks, *,
                  calibration=None) -> dict[str, torch.Tensor]:
        """``weight: (M, N, 1..)`` -> ``core{k}: (r_{k-1}, m_k, n_k, r_k)`` by TT-SVD."""
        in_m, out_m = self.modes(spec)
        self.validate_ranks(spec, tuple(ranks))
        cores, _ = tt_svd(weight.reshape(spec.out_channels, spec.in_channels), in_m, out_m, ranks)
        return {f"core{k}": g for k, g in enumerate(cores)}

    def reconstruct(self, factors: dict[str, torch.Tensor], spec: ConvSpec) -> torch.Tensor:
        cores = [factors[f"core{k}"] for k in range(sum(1 for n in factors if n.startswith("core")))]
        w = tt_full(cores)
        return w.reshape(spec.out_channels, spec.in_channels, *([1] * spec.dim))

    def factors_of(self, module: Factorized) -> dict[str, torch.Tensor]:
        return {f"core{k}": g.detach().double() for k, g in enumerate(module[0].get_cores())}

    def build(self, spec: ConvSpec, ranks: Ranks, factors=None, *, dtype=None, device=None) -> Factorized:
        in_m, out_m = self.modes(spec)
        self.validate_ranks(spec, tuple(ranks))
        conv = {}
        if not spec.is_linear:
            pad = []
            for lo, hi in reversed(spec.padding):
                pad += [lo, hi]
            conv = dict(channel_dim=1, stride=spec.stride, pad=pad, pad_mode=spec.padding_mode)
        layer = TTLinear(in_m, out_m, ranks, bias=spec.bias, dtype=dtype, device=device, **conv)
        if factors is not None:
            layer.set_cores([factors[f"core{k}"] for k in range(len(in_m))])
            if spec.bias and factors.get("bias") is not None:
                with torch.no_grad():
                    layer.bias.copy_(factors["bias"].to(layer.bias.dtype))
        return self.factorized(spec, ranks, layer)

    def cost(self, spec: ConvSpec, ranks: Ranks, input_size: Sequence[int] = ()) -> Cost:
        in_m, out_m = self.modes(spec)
        full = (1, *ranks, 1)
        params = sum(full[k] * m * n * full[k + 1] for k, (m, n) in enumerate(zip(out_m, in_m)))
        positions = math.prod(spec.output_size(input_size)) if not spec.is_linear else 1
        return Cost(params=params + (spec.out_channels if spec.bias else 0),
                    macs=positions * tt_macs(in_m, out_m, ranks))

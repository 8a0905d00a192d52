"""The one interface every factorization method implements.

A method is a :class:`Method` subclass holding four pieces (see shared/DESIGN.md):

* rank arithmetic: :meth:`Method.full_rank`, :meth:`Method.max_rank`, :meth:`Method.resolve_ranks`
  (a ``rank`` / ``macs_ratio`` / ``energy`` target to a tuple of ints);
* :meth:`Method.factorize`: pure tensor math, ``weight: (N, C/groups, *kernel)`` in float64 in,
  a dict of named factor tensors out; no ``nn.Module`` involved;
* :meth:`Method.build`: the drop-in replacement, a :class:`Factorized` (an ``nn.Sequential`` of
  ordinary convs) carrying every conv option via :func:`convfactor.spec.convspec.make_conv`;
* :meth:`Method.cost`: closed-form ``(params, macs)`` for a given spatial input size.

plus :meth:`Method.reconstruct` (factors back to a dense kernel, for errors and tests) and
:meth:`Method.spectra` (the singular values that an ``energy`` target is measured on).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..spec.convspec import ConvSpec, UnsupportedLayer

__all__ = ["Method", "Factorized", "Cost", "Ranks", "energy_rank"]

Ranks = tuple[int, ...]


@dataclass(frozen=True)
class Cost:
    """Closed-form cost of a layer. ``macs`` are multiply-accumulates (FLOPs / 2), not time."""

    params: int
    macs: int


class Factorized(nn.Sequential):
    """A factorized layer: an ``nn.Sequential`` of ordinary layers plus the recipe that made it.

    ``method``, ``ranks``, ``spec`` and ``options`` are what :func:`convfactor.save` writes to the
    JSON recipe, and what :func:`convfactor.load` rebuilds the empty module from.
    """

    def __init__(self, *pieces: nn.Module, method: str, spec: ConvSpec, ranks: Ranks,
                 options: dict | None = None):
        super().__init__(*pieces)
        self.method = method
        self.spec = spec
        self.ranks = tuple(int(r) for r in ranks)
        self.options = dict(options or {})

    def recipe(self) -> dict:
        return {"method": self.method, "ranks": list(self.ranks), "spec": self.spec.to_dict(),
                "options": self.options}

    def extra_repr(self) -> str:
        return f"method={self.method}, ranks={self.ranks}"


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest k such that the top-k squared singular values hold ``energy`` of the total.

    ``singular_values``: (..., n) sorted descending; leading axes (e.g. groups) take the max.
    """
    s2 = singular_values.double().pow(2)
    s2 = s2.reshape(-1, s2.shape[-1])
    total = s2.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    frac = s2.cumsum(-1) / total
    # Tolerance: energy=1.0 must give the numerical rank, not fail on round-off.
    ks = (frac < energy - 1e-12).sum(-1) + 1
    return int(ks.clamp(max=s2.shape[-1]).max())


class Method:
    """Base class; subclasses set ``name`` and implement the abstract pieces."""

    name: str = ""
    #: number of ranks (1 for SVD-like methods, 2 for Tucker-2, ...)
    n_ranks: int = 1
    #: names of the ranks, for messages and reports
    rank_names: tuple[str, ...] = ("rank",)
    #: accepts nn.Linear (spec.dim == 0)
    supports_linear: bool = False
    #: spatial dimensionalities supported (1 = Conv1d, 2 = Conv2d, 3 = Conv3d)
    supported_dims: tuple[int, ...] = (2,)
    #: whether an ``energy`` target is defined
    supports_energy: bool = True

    # ------------------------------------------------------------------ applicability
    def check(self, spec: ConvSpec) -> None:
        """Raise :class:`UnsupportedLayer` with a reason if this method cannot handle ``spec``."""
        if spec.is_linear:
            if not self.supports_linear:
                raise UnsupportedLayer(f"{self.name}: nn.Linear is not supported (use 'linear_svd' or 'tt')")
        elif spec.dim not in self.supported_dims:
            raise UnsupportedLayer(f"{self.name}: Conv{spec.dim}d is not supported")
        if all(m <= 1 for m in self.full_rank(spec)):
            raise UnsupportedLayer(f"{self.name}: full rank is {self.full_rank(spec)}, nothing to factorize")

    # ------------------------------------------------------------------ rank arithmetic
    def full_rank(self, spec: ConvSpec) -> Ranks:
        """Ranks at which the factorization is exact."""
        raise NotImplementedError

    def max_rank(self, spec: ConvSpec) -> Ranks:
        """Largest ranks accepted (default: the full rank)."""
        return self.full_rank(spec)

    def expand_rank(self, spec: ConvSpec, rank: int | Sequence[int]) -> Ranks:
        """Normalize a user's ``rank`` to a tuple of ``n_ranks`` ints."""
        if isinstance(rank, (int,)) and not isinstance(rank, bool):
            return (int(rank),) * self.n_ranks
        if isinstance(rank, (tuple, list)) and len(rank) == self.n_ranks and all(
                isinstance(r, int) and not isinstance(r, bool) for r in rank):
            return tuple(int(r) for r in rank)
        raise ValueError(f"{self.name}: rank must be an int or a tuple of {self.n_ranks} ints "
                         f"({', '.join(self.rank_names)}), got {rank!r}")

    def validate_ranks(self, spec: ConvSpec, ranks: Ranks) -> Ranks:
        top = self.max_rank(spec)
        for name, r, m in zip(self.rank_names, ranks, top):
            if r < 1 or r > m:
                raise ValueError(f"{self.name}: {name}={r} is out of range [1, {m}] for this layer "
                                 f"(C={spec.in_channels}, N={spec.out_channels}, kernel={spec.kernel_size}, "
                                 f"groups={spec.groups})")
        return tuple(ranks)

    def scaled_ranks(self, spec: ConvSpec, t: float) -> Ranks:
        """The one-parameter family used by ``macs_ratio`` targets: ranks ~ t * full rank."""
        return tuple(max(1, min(m, math.ceil(t * m))) for m in self.full_rank(spec))

    def resolve_ranks(self, spec: ConvSpec, weight: torch.Tensor | None = None, *, rank=None,
                      macs_ratio: float | None = None, energy: float | None = None,
                      input_size: Sequence[int] | None = None) -> Ranks:
        """Exactly one of ``rank``, ``macs_ratio`` (MACs after / before) and ``energy``."""
        check_target(rank, macs_ratio, energy)
        if rank is not None:
            return self.validate_ranks(spec, self.expand_rank(spec, rank))
        if macs_ratio is not None:
            return self.ranks_for_macs(spec, float(macs_ratio), input_size)
        if not self.supports_energy:
            raise ValueError(f"{self.name}: an energy target is not defined; give rank= or macs_ratio=")
        if weight is None:
            raise ValueError("an energy target needs the weight")
        spectra = self.spectra(weight.detach().double(), spec)
        ranks = tuple(energy_rank(s, float(energy)) for s in spectra)
        return tuple(min(r, m) for r, m in zip(ranks, self.max_rank(spec)))

    def ranks_for_macs(self, spec: ConvSpec, ratio: float, input_size: Sequence[int] | None = None) -> Ranks:
        """Largest member of the :meth:`scaled_ranks` family whose MACs are <= ratio x dense."""
        size = default_input_size(spec) if input_size is None else tuple(input_size)
        budget = ratio * spec.dense_macs(size)
        # Candidate ranks: every distinct member of the family, searched in order.
        top = max(self.full_rank(spec))
        best = None
        lo, hi = 1, top
        while lo <= hi:  # macs are monotone in t
            mid = (lo + hi) // 2
            ranks = self.scaled_ranks(spec, mid / top)
            if self.cost(spec, ranks, size).macs <= budget + 1e-9:
                best, lo = ranks, mid + 1
            else:
                hi = mid - 1
        if best is None:
            smallest = self.cost(spec, self.scaled_ranks(spec, 1 / top), size).macs
            raise ValueError(f"{self.name}: macs_ratio={ratio} is unreachable for this layer; "
                             f"the smallest rank already costs {smallest / max(1, spec.dense_macs(size)):.3f} "
                             f"of the dense MACs")
        return best

    # ------------------------------------------------------------------ the four pieces
    def spectra(self, weight: torch.Tensor, spec: ConvSpec) -> list[torch.Tensor]:
        """Per rank: singular values, shape (groups, n) sorted descending, that ``energy`` uses."""
        raise NotImplementedError

    def factorize(self, weight: torch.Tensor, spec: ConvSpec, ranks: Ranks, **options) -> dict[str, torch.Tensor]:
        """Pure math. ``weight: (N, C/groups, *kernel)`` (float64); returns named factors."""
        raise NotImplementedError

    def reconstruct(self, factors: dict[str, torch.Tensor], spec: ConvSpec) -> torch.Tensor:
        """Dense kernel ``(N, C/groups, *kernel)`` represented by ``factors``."""
        raise NotImplementedError

    def build(self, spec: ConvSpec, ranks: Ranks, factors: dict[str, torch.Tensor] | None = None, *,
              dtype=None, device=None, **options) -> Factorized:
        """The replacement module; with ``factors=None`` it is left uninitialized (for loading)."""
        raise NotImplementedError

    def cost(self, spec: ConvSpec, ranks: Ranks, input_size: Sequence[int] = ()) -> Cost:
        """Closed-form params and MACs for a spatial ``input_size`` (one sample)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses
    def options_for_recipe(self, options: dict[str, Any]) -> dict:
        """The JSON-able subset of ``options`` that :meth:`build` needs to rebuild the module."""
        return {}


def check_target(rank, macs_ratio, energy) -> None:
    """Exactly one of the three targets; ``macs_ratio`` and ``energy`` in (0, 1]."""
    if sum(x is not None for x in (rank, macs_ratio, energy)) != 1:
        raise ValueError("give exactly one of rank=, macs_ratio=, energy=")
    for name, value in (("macs_ratio", macs_ratio), ("energy", energy)):
        if value is not None and not (0 < float(value) <= 1):
            raise ValueError(f"{name} must be in (0, 1], got {value}")


def default_input_size(spec: ConvSpec) -> tuple[int, ...]:
    """A nominal spatial size for ratio arithmetic when no example input is given."""
    return tuple(max(32, 8 * s) for s in spec.stride)


def copy_into(module: nn.Module, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
    """Copy tensors into a conv/linear (or a ``Sequential(Pad, conv)``) under no_grad."""
    from ..spec.convspec import conv_of
    layer = conv_of(module)
    with torch.no_grad():
        if weight is not None:
            layer.weight.copy_(weight.reshape(layer.weight.shape).to(layer.weight.dtype))
        if bias is not None:
            layer.bias.copy_(bias.to(layer.bias.dtype))

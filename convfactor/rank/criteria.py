"""Per-layer criteria: condition-number marking, the speed bound, hardware-friendly rank rounding.

* **Condition number** (Sedky & Hosmer): a layer is worth decomposing when its kernel matrix is
  ill-conditioned, ``kappa = s_max / s_min > threshold`` (:func:`mark_by_condition`).
* **Speed bound**: a factorization only pays when its MACs are *below* the dense layer's; e.g.
  for spatial SVD (Tai et al. 2016), ``K (d C + d N) < d^2 N C``, i.e. ``K < d N C / (N + C)``.
  :func:`below_dense` checks that with the method's own closed-form :meth:`Method.cost`, so it
  holds for every method; :func:`speed_bound` is the largest rank of a method's one-parameter
  family that passes.
* **Rounding** to multiples of 8 or 16 (SIMD widths / tensor-core tiles): :func:`round_ranks`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..compression.inspect import condition_number
from ..methods.linalg import grouped_matrix
from ..spec.convspec import ConvSpec

__all__ = ["layer_kappa", "mark_by_condition", "below_dense", "speed_bound", "round_ranks",
           "family", "clip_to_speed_bound"]


def layer_kappa(weight: torch.Tensor, spec: ConvSpec) -> float:
    """Condition number of the ``(N/g, C/g * prod(k))`` kernel matrix (largest over groups)."""
    s = torch.linalg.svdvals(grouped_matrix(weight.detach().double(), spec.groups))
    return condition_number(s)


def mark_by_condition(kappas: dict[str, float], threshold: float) -> dict[str, bool]:
    """``name -> decompose?``: True where ``kappa > threshold`` (Sedky & Hosmer)."""
    if not threshold > 0:
        raise ValueError(f"the condition-number threshold must be > 0, got {threshold}")
    return {name: bool(k > threshold) for name, k in kappas.items()}


def below_dense(method, spec: ConvSpec, ranks: Sequence[int], input_size: Sequence[int] = ()) -> bool:
    """True when ``method`` at ``ranks`` costs strictly fewer MACs than the dense layer."""
    return method.cost(spec, tuple(ranks), input_size).macs < spec.dense_macs(input_size)


def family(method, spec: ConvSpec) -> list[tuple[int, ...]]:
    """Distinct members of the method's one-parameter rank family, from smallest to full rank."""
    top = max(method.full_rank(spec))
    out: list[tuple[int, ...]] = []
    for k in range(1, top + 1):
        ranks = tuple(method.scaled_ranks(spec, k / top))
        if not out or ranks != out[-1]:
            out.append(ranks)
    return out


def speed_bound(method, spec: ConvSpec, input_size: Sequence[int] = ()) -> tuple[int, ...] | None:
    """Largest member of the method's rank family whose MACs are below the dense layer's.

    ``None`` when even the smallest rank does not reduce MACs (the layer should stay dense).
    """
    best = None
    for ranks in family(method, spec):     # MACs grow with rank along the family
        if below_dense(method, spec, ranks, input_size):
            best = ranks
        else:
            break
    return best


def clip_to_speed_bound(method, spec: ConvSpec, ranks: Sequence[int],
                        input_size: Sequence[int] = ()) -> tuple[int, ...] | None:
    """``ranks`` if they pass the speed bound, else the speed bound itself (None: keep dense)."""
    ranks = tuple(int(r) for r in ranks)
    if below_dense(method, spec, ranks, input_size):
        return ranks
    bound = speed_bound(method, spec, input_size)
    if bound is None:
        return None
    # Keep what the caller asked for on each axis where it is already at or below the bound.
    clipped = tuple(min(r, b) for r, b in zip(ranks, bound))
    return clipped if below_dense(method, spec, clipped, input_size) else bound


def round_ranks(ranks: Sequence[int], multiple: int | None, max_ranks: Sequence[int],
                mode: str = "nearest") -> tuple[int, ...]:
    """Round each rank to a multiple of ``multiple`` (8, 16, ...), within ``[1, max]``, never 0.

    ``mode``: 'nearest', 'up' or 'down'.  A rank whose rounded value would be 0 becomes
    ``multiple`` (or the max rank, when that is smaller); one above the max rank stays the max.
    """
    if not multiple or multiple <= 1:
        return tuple(max(1, min(int(r), int(m))) for r, m in zip(ranks, max_ranks))
    if mode not in ("nearest", "up", "down"):
        raise ValueError(f"mode must be 'nearest', 'up' or 'down', got {mode!r}")
    out = []
    for r, m in zip(ranks, max_ranks):
        q = r / multiple
        k = math.floor(q + 0.5) if mode == "nearest" else (math.ceil(q) if mode == "up" else math.floor(q))
        value = k * multiple
        if value < 1:
            value = multiple
        out.append(int(max(1, min(value, m))))
    return tuple(out)

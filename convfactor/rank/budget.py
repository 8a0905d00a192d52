"""Global budget: spread a whole-model MACs or params target over layers.

Zhang et al. 2016 ("Accelerating Very Deep Convolutional Networks for Classification and
Detection", TPAMI, Sec. 3.3, eq. 13) choose ranks that maximize the product of the layers' kept
PCA energies subject to a complexity budget, greedily removing the eigenvalue that costs least
energy per complexity saved.  Here each layer's candidate states (dense, then its method's rank
family below the speed bound, optionally rounded) are points ``(cost, -log energy kept)``; the
greedy walks every layer's *lower convex hull* in order of slope (optimal for this separable
problem up to one step), then a fill pass raises ranks to land within ``tolerance`` of the target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..spec.convspec import ConvSpec
from .criteria import below_dense, family, round_ranks
from .energy import error_estimate, log_retained

__all__ = ["LayerCandidates", "candidates_for", "allocate", "parse_ratio"]


def parse_ratio(text: str | float) -> float:
    """'40%' -> 0.4, '3x' -> 1/3, 0.4 -> 0.4: the fraction of the cost kept (MACs/params)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        t = str(text).strip().lower()
        try:
            if t.endswith("%"):
                value = float(t[:-1]) / 100
            elif t.endswith("x"):
                factor = float(t[:-1])
                if factor <= 0:
                    raise ValueError
                value = 1 / factor
            else:
                value = float(t)
        except ValueError:
            raise ValueError(f"a ratio must look like '40%', '3x' or 0.4, got {text!r}") from None
    if not 0 < value <= 1:
        raise ValueError(f"a cost ratio must be in (0, 1] (e.g. '40%' or '3x'), got {text!r}")
    return value


@dataclass
class LayerCandidates:
    """A layer's states: index 0 is dense (ranks None, error 0); the rest are factorized."""

    name: str
    states: list[tuple[int, ...] | None]
    cost: list[float]
    error: list[float]            # relative kernel error estimate
    objective: list[float]        # -log(energy kept), what the greedy minimizes
    current: int = 0
    hull: list[int] = field(default_factory=list)


def candidates_for(name: str, method, spec: ConvSpec, weight: torch.Tensor, input_size: Sequence[int],
                   metric: str = "macs", batch: int = 1, round_to: int | None = None,
                   spectra: list[torch.Tensor] | None = None) -> LayerCandidates:
    """Dense plus every family member of ``method`` below the speed bound (rounded, deduplicated)."""
    if spectra is None:
        spectra = method.spectra(weight.detach().double(), spec)
    top = method.max_rank(spec)
    seen: set = set()
    states: list = [None]
    dense = spec.dense_macs(input_size) * batch if metric == "macs" else spec.dense_params()
    cost, error, objective = [float(dense)], [0.0], [0.0]
    for ranks in family(method, spec):
        ranks = round_ranks(ranks, round_to, top) if round_to else tuple(ranks)
        if ranks in seen:
            continue
        seen.add(ranks)
        if not below_dense(method, spec, ranks, input_size):       # the speed bound
            continue
        c = method.cost(spec, ranks, input_size)
        value = c.macs * batch if metric == "macs" else c.params
        if metric == "params" and value >= dense:
            continue
        states.append(ranks)
        cost.append(float(value))
        error.append(error_estimate(spectra, ranks))
        objective.append(log_retained(spectra, ranks))
    return LayerCandidates(name, states, cost, error, objective)


def _lower_hull(c: LayerCandidates) -> list[int]:
    """Indices of the lower convex hull of (cost, objective), from the dense state to the cheapest."""
    order = sorted(range(len(c.states)), key=lambda i: (-c.cost[i], c.objective[i]))
    hull: list[int] = []
    for i in order:
        if hull and c.cost[i] >= c.cost[hull[-1]]:
            continue      # same cost as the last hull point, and no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # the slope (objective added per cost saved) must increase along the hull
            s_ab = (c.objective[b] - c.objective[a]) / max(1e-30, c.cost[a] - c.cost[b])
            s_ai = (c.objective[i] - c.objective[a]) / max(1e-30, c.cost[a] - c.cost[i])
            if s_ai <= s_ab:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(layers: list[LayerCandidates], budget: float, tolerance: float,
             overshoot: float = 0.0) -> tuple[float, bool]:
    """Set each layer's ``current`` state so the total cost lands in ``[budget - tolerance, budget + overshoot]``
    where the layers' granularity allows (the greedy ends at or below ``budget``; the fill may go up
    to ``budget + overshoot``).

    Returns ``(total cost, reachable)``; when the budget cannot be met the cheapest states are kept.
    """
    for c in layers:
        c.current = 0
        c.hull = _lower_hull(c)
    total = sum(c.cost[0] for c in layers)
    if total <= budget:
        return total, True
    total = _descend_hulls(layers, total, budget)
    if total > budget:
        return total, False
    return _fill(layers, total, budget, tolerance, budget + overshoot), True


def _descend_hulls(layers: list[LayerCandidates], total: float, budget: float) -> float:
    """Walk every layer's hull segments in order of objective added per cost saved, until the total
    is within ``budget`` (or every layer is at its cheapest state); returns the total."""
    segments = []
    for li, c in enumerate(layers):
        for a, b in zip(c.hull, c.hull[1:]):
            slope = (c.objective[b] - c.objective[a]) / max(1e-30, c.cost[a] - c.cost[b])
            segments.append((slope, li, a, b))
    segments.sort(key=lambda s: s[0])
    for slope, li, a, b in segments:
        c = layers[li]
        if c.current != a:        # convexity keeps a layer's segments in order; be safe anyway
            continue
        total += c.cost[b] - c.cost[a]
        c.current = b
        if total <= budget:
            break
    return total


def _fill(layers: list[LayerCandidates], total: float, budget: float, tolerance: float, limit: float) -> float:
    """Raise ranks (any state, not only the hull) while the total stays within ``limit``, until it is
    within ``tolerance`` below ``budget``; error-reducing moves first.  Returns the total."""
    while budget - total > tolerance:
        best = _best_move(layers, limit - total, improving=True) or _best_move(layers, limit - total, improving=False)
        if best is None:
            break
        li, i, gain = best
        layers[li].current = i
        total += gain
    return total


def _best_move(layers: list[LayerCandidates], room: float, improving: bool) -> tuple[int, int, float] | None:
    """``(layer, state, cost added)`` of the best single move costing at most ``room``: with
    ``improving``, the one lowering the objective most (ties: the costlier); else the costliest."""
    best, best_key = None, None
    for li, c in enumerate(layers):
        here = c.cost[c.current]
        for i, cost in enumerate(c.cost):
            gain = cost - here
            if not 0 < gain <= room:
                continue
            if improving and not c.objective[i] < c.objective[c.current] + 1e-15:
                continue
            key = (c.objective[c.current] - c.objective[i], gain) if improving else gain
            if best_key is None or key > best_key:
                best, best_key = (li, i, gain), key
    return best

"""Rank selection and compression planning.

* :mod:`~convfactor.rank.energy`: errors from spectra, energy ranks;
* :mod:`~convfactor.rank.vbmf`: EVBMF (:func:`evbmf`), weakening, the rank floor;
* :mod:`~convfactor.rank.criteria`: condition-number marking, the speed bound, rank rounding;
* :mod:`~convfactor.rank.budget`: global MACs/params budgets;
* :mod:`~convfactor.rank.latency`: timing cache, measured-latency choice, :class:`LatencyConfig`;
* :mod:`~convfactor.rank.target`: the typed :class:`Target` and the accepted :class:`SpeedupBand`;
* :mod:`~convfactor.rank.facts`: per-layer facts and the model's totals, from one forward pass;
* :mod:`~convfactor.rank.criterion`: the :class:`Criterion` objects (rank, uniform, energy, VBMF, budget);
* :mod:`~convfactor.rank.latency_search`: the latency criterion (timing table, measured tries);
* :mod:`~convfactor.rank.planfile`: the :class:`Plan` file; :mod:`~convfactor.rank.planner`: :func:`plan`.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Plan": "planfile", "LayerPlan": "planfile", "PlanSummary": "planfile", "plan": "planner",
    "Target": "target", "SpeedupBand": "target", "RankConfig": "criterion", "Criterion": "criterion",
    "LatencyConfig": "latency", "LatencyCriterion": "latency_search", "Trial": "latency_search",
    "evbmf": "vbmf", "evbmf_spectrum": "vbmf", "weaken": "vbmf", "kernel_vbmf_ranks": "vbmf",
    "speed_bound": "criteria", "below_dense": "criteria", "round_ranks": "criteria",
    "mark_by_condition": "criteria", "allocate": "budget", "parse_ratio": "budget",
    "LatencyCache": "latency", "error_estimate": "energy",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convfactor.rank' has no attribute {name!r}")

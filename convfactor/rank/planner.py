"""``convfactor.plan(model, example_input, target=..., criterion=...) -> Plan``.

The planner collects the selected layers' facts and the model's totals (one forward pass), marks
the layers to leave dense, and hands the rest to a criterion object
(:mod:`convfactor.rank.criterion`, :mod:`convfactor.rank.latency_search`):

* ``'rank'``      a fixed rank for every layer (``target={'rank': r}``);
* ``'uniform'``   the same per-layer MACs ratio everywhere (``target='macs=40%'`` per layer);
* ``'energy'``    the smallest ranks keeping ``energy`` of each spectrum;
* ``'vbmf'``      EVBMF ranks (Nakajima et al. 2013, as in Kim et al. 2016), weakened by ``weakening``;
* ``'budget'``    a whole-model MACs or params target (``'macs=40%'``, ``'params=3x'``) spread
  greedily over the layers' spectra (Zhang et al. 2016; :mod:`convfactor.rank.budget`);
* ``'latency'``   a measured end-to-end speed-up (``'speedup=3x'``) or an error budget
  (``'error=0.2'``), verified end to end against the original model in its own fastest form.

Every criterion honours the speed bound (a rank whose MACs are not below the dense layer's is
never chosen; such layers stay dense), optional rounding of ranks to a multiple
(``RankConfig(round_to=8)``) and optional condition-number marking (``RankConfig(kappa_threshold=...)``:
layers with ``kappa <= threshold`` stay dense, Sedky & Hosmer).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..compression.batchnorm import folded_copy
from ..methods import registry
from ..methods.base import Method
from ..utils import as_inputs, eval_mode
from .criterion import (BudgetCriterion, Criterion, EnergyCriterion, PlanContext, RankConfig, RankCriterion,
                        UniformCriterion, VBMFCriterion)
from .facts import LayerFacts, collect
from .latency import DEFAULT_RATIOS, LatencyConfig
from .latency_search import LatencyCriterion
from .planfile import LayerPlan, Plan, layer_signature
from .target import Target

__all__ = ["plan", "Plan", "LayerPlan", "Target", "RankConfig", "LatencyConfig", "Criterion", "CRITERIA",
           "DEFAULT_RATIOS"]

#: criterion name -> class; ``plan(criterion=...)`` also takes an instance of a user's own Criterion
CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (RankCriterion, UniformCriterion, EnergyCriterion,
                                                            VBMFCriterion, BudgetCriterion, LatencyCriterion)}
#: the criterion used when none is given, by target kind (no target: VBMF)
DEFAULT_CRITERION = {None: "vbmf", "speedup": "latency", "error": "latency", "macs": "budget",
                     "params": "budget", "energy": "energy", "rank": "rank"}


def plan(model: nn.Module, example_input, target=None, criterion: str | Criterion | None = None, *,
         method: str | None = None, methods: Sequence[str] | None = None, op_names: Sequence[str] | None = None,
         exclude: Sequence[str] | None = None, config: RankConfig | None = None,
         latency: LatencyConfig | None = None, model_name: str | None = None, progress: bool | None = None) -> Plan:
    """Plan the compression of ``model`` for ``example_input`` (see the module docstring).

    ``target``: a :class:`Target`, ``'macs=40%'``, ``'params=3x'``, ``'speedup=3x'``, ``'error=0.2'``,
    ``'energy=0.9'``, ``'rank=8'`` or a one-item dict.  ``criterion``: a name in :data:`CRITERIA` or a
    :class:`Criterion`; by default from the target (speedup/error -> latency, macs/params -> budget,
    energy -> energy, rank -> rank; none -> vbmf).  ``method``/``methods``: the factorizations to use
    (the latency criterion tries several).  ``config``: rounding, kappa marking, energy, weakening,
    budget tolerance, BatchNorm folding (``RankConfig.fold_bn``, on by default: layers are planned on
    their kernels with the following eval-mode BN folded in); ``latency``: how the latency criterion measures.  ``progress``: progress bars and
    one line per end-to-end check on stderr (default: on for the latency criterion, which takes
    minutes).  ``model`` is not modified.
    """
    goal = Target.parse(target)
    chooser = _criterion(criterion, goal)
    config = config if config is not None else RankConfig()
    latency = latency if latency is not None else LatencyConfig()
    chosen_methods = _methods(method, methods, chooser)
    x0 = as_inputs(example_input)[0]
    model = folded_copy(model, example_input) if config.fold_bn else model     # the kernels compress factorizes
    with eval_mode(model):
        layers, totals = collect(model, example_input, chosen_methods, op_names, exclude,
                                 on_data=config.error in ("output", "response"), response=config.error == "response")
        result = Plan(criterion=chooser.name, target=goal.as_dict() if goal else {}, model=model_name,
                      input_shape=list(x0.shape), model_layers=layer_signature(model))
        result.summary.update(kappa_threshold=config.kappa_threshold, error_metric=config.error,
                              round_to=int(config.round_to) if config.round_to else None)
        active, dense_notes = _mark(layers, config.kappa_threshold)
        progress = chooser.name == "latency" if progress is None else progress
        context = PlanContext(model, example_input, goal, config, latency, totals, result, progress)
        chosen = chooser(active, context)
        result.layers = [chosen.get(f.name) or f.layer_plan(None, None, chooser.name, note=dense_notes.get(f.name))
                         for f in layers]
        result.summary.update(**totals.after(result.layers))
    return result


def _criterion(criterion: str | Criterion | None, target: Target | None) -> Criterion:
    """The criterion object for a name (or the default for ``target``), checked against ``target``."""
    if isinstance(criterion, Criterion):
        chooser = criterion
    else:
        name = criterion if criterion is not None else DEFAULT_CRITERION[target.kind if target else None]
        if name not in CRITERIA:
            raise ValueError(f"unknown criterion {name!r} (known: {', '.join(CRITERIA)})")
        chooser = CRITERIA[name]()
    chooser.check(target)
    return chooser


def _methods(method: str | None, methods: Sequence[str] | str | None, criterion: Criterion) -> list:
    """The Method objects to use: those given (configured methods, or names such as
    ``sliced_svd:slices=4``), else the criterion's defaults that the registry has."""
    names = methods if methods is not None else ([method] if method else None)
    if isinstance(names, str):
        names = [names]
    if names is None:
        available = set(registry.available())
        names = [n for n in criterion.default_methods if n in available]
    try:
        return [n if isinstance(n, Method) else registry.parse(n) for n in names]
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None


def _mark(layers: list[LayerFacts], kappa_threshold: float | None) -> tuple[list[LayerFacts], dict[str, str]]:
    """``(layers to plan, notes of the layers that stay dense)``: no applicable method, or
    ``kappa <= kappa_threshold`` (Sedky & Hosmer)."""
    active, notes = [], {}
    for f in layers:
        if not f.methods:
            notes[f.name] = "no method supports this layer"
        elif kappa_threshold is not None and f.kappa <= kappa_threshold:
            notes[f.name] = f"kappa {f.kappa:.3g} <= threshold {kappa_threshold:g}"
        else:
            active.append(f)
    return active, notes

"""Criterion objects: each is called on the selected layers' facts and returns the per-layer plans.

:class:`Criterion` is the small interface the planner calls (Torch-Pruning's ``Importance`` is the
model: an object handed to the planner, not a string it branches on).  The built-in ones:

* :class:`RankCriterion`    a fixed rank for every layer (``rank=8``);
* :class:`UniformCriterion` the same per-layer MACs ratio everywhere (``macs=40%`` per layer);
* :class:`EnergyCriterion`  the smallest ranks keeping ``energy`` of each spectrum;
* :class:`VBMFCriterion`    EVBMF ranks (Nakajima et al. 2013, as in Kim et al. 2016), weakened;
* :class:`BudgetCriterion`  a whole-model MACs or params target spread greedily over the layers'
  spectra (Zhang et al. 2016; :mod:`convfactor.rank.budget`);
* ``LatencyCriterion`` (:mod:`convfactor.rank.latency_search`): a measured end-to-end speed-up.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence

from torch import nn

from .budget import allocate, candidates_for
from .energy import energy_rank
from .facts import LayerFacts, Totals
from .latency import LatencyConfig
from .planfile import LayerPlan, Plan
from .target import Target
from .vbmf import kernel_vbmf_ranks

__all__ = ["Criterion", "PlanContext", "RankConfig", "KeepDense", "RankCriterion", "UniformCriterion",
           "EnergyCriterion", "VBMFCriterion", "BudgetCriterion"]


@dataclass(frozen=True)
class RankConfig:
    """How ranks are shaped, whatever the criterion.

    ``round_to``: round ranks to a multiple (8, 16); ``kappa_threshold``: layers with
    ``kappa <= threshold`` stay dense (Sedky & Hosmer); ``energy``: kept per spectrum by the energy
    criterion (an ``energy=`` target overrides it); ``weakening``: VBMF's ``w`` in [0, 1];
    ``tolerance``: the budget criterion's relative tolerance on its target; ``fold_bn``: plan on the
    kernels with each eval-mode BatchNorm folded in, as :func:`convfactor.compress` does by default.
    ``error``: what a candidate's error is: ``"kernel"`` (relative kernel error, a weight-space proxy)
    or ``"output"`` (relative error of the layer's output on the inputs the example input gives it:
    data-aware; give an example made of real data) or ``"response"`` (the same, but for channel /
    linear SVD the error the data-aware fit reaches, its closed form: plan this way for
    ``Plan.apply(..., calibration=...)``).
    """

    round_to: int | None = None
    kappa_threshold: float | None = None
    energy: float = 0.9
    weakening: float = 1.0
    tolerance: float = 0.02
    fold_bn: bool = True
    error: str = "kernel"

    def __post_init__(self):
        if self.error not in ("kernel", "output", "response"):
            raise ValueError(f"error must be 'kernel', 'output' or 'response', got {self.error!r}")
        if not isinstance(self.fold_bn, bool):
            raise ValueError(f"fold_bn must be True or False, got {self.fold_bn!r}")
        if self.round_to is not None and (isinstance(self.round_to, bool) or int(self.round_to) < 1):
            raise ValueError(f"round_to must be a positive int (8, 16), got {self.round_to!r}")
        if self.kappa_threshold is not None and not self.kappa_threshold > 0:
            raise ValueError(f"kappa_threshold must be > 0, got {self.kappa_threshold}")
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if not 0 <= self.weakening <= 1:
            raise ValueError(f"weakening must be in [0, 1], got {self.weakening}")
        if not self.tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")


@dataclass
class PlanContext:
    """What a criterion sees besides the layer facts.  ``plan`` is the plan being built: criteria
    record their figures in ``plan.summary`` (the latency criterion also its format and machine)."""

    model: nn.Module
    example_input: object
    target: Target | None
    config: RankConfig
    latency: LatencyConfig
    totals: Totals
    plan: Plan
    progress: bool = False


class KeepDense(Exception):
    """Raised by :meth:`PerLayerCriterion.ranks` to keep a layer dense; the message is the note."""


class Criterion(ABC):
    """Chooses per-layer plans; ``__call__(layers, context) -> {layer name: LayerPlan}``.

    ``needs``: the target kinds it accepts (empty: any, or none); ``default_methods``: the methods it
    uses when the caller names none (those the registry has).  A layer it leaves out stays dense.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    default_methods: ClassVar[tuple[str, ...]] = ("channel_svd", "linear_svd")

    def check(self, target: Target | None) -> None:
        """Raise ValueError when ``target`` is not one this criterion works with."""
        if self.needs and (target is None or target.kind not in self.needs):
            raise ValueError(f"criterion {self.name!r} needs a target of {' or '.join(k + '=...' for k in self.needs)}")

    @abstractmethod
    def __call__(self, layers: Sequence[LayerFacts], context: PlanContext) -> dict[str, LayerPlan]:
        """Plans for (some of) ``layers``, each with ``layers[i].methods``."""


class PerLayerCriterion(Criterion):
    """Ranks chosen layer by layer with the layer's first method, rounded and held to the speed bound."""

    @abstractmethod
    def ranks(self, facts: LayerFacts, method, context: PlanContext) -> tuple[int, ...]:
        """The ranks this criterion wants for one layer (raise :class:`KeepDense` to skip it)."""

    def settings(self, context: PlanContext) -> dict:
        """Figures to record in the plan's summary."""
        return {}

    def __call__(self, layers: Sequence[LayerFacts], context: PlanContext) -> dict[str, LayerPlan]:
        context.plan.summary.update(**self.settings(context))
        return {facts.name: self.choose(facts, context) for facts in layers}

    def choose(self, facts: LayerFacts, context: PlanContext) -> LayerPlan:
        method = facts.methods[0]
        try:
            wanted = self.ranks(facts, method, context)
        except KeepDense as exc:
            return facts.layer_plan(None, None, self.name, note=str(exc))
        ranks, note = facts.bounded(method, wanted, context.config.round_to)
        return facts.layer_plan(method if ranks else None, ranks, self.name, note=note)


class RankCriterion(PerLayerCriterion):
    name = "rank"
    needs = ("rank",)

    def ranks(self, facts, method, context):
        return method.expand_rank(facts.spec, int(context.target.value))


class UniformCriterion(PerLayerCriterion):
    name = "uniform"
    needs = ("macs",)

    def ranks(self, facts, method, context):
        try:
            return method.ranks_for_macs(facts.spec, context.target.value, facts.size)
        except ValueError as exc:
            raise KeepDense(str(exc)) from None


class EnergyCriterion(PerLayerCriterion):
    name = "energy"

    @staticmethod
    def energy(context: PlanContext) -> float:
        target = context.target
        return target.value if target is not None and target.kind == "energy" else context.config.energy

    def ranks(self, facts, method, context):
        energy = self.energy(context)
        return tuple(min(energy_rank(s, energy), top)
                     for s, top in zip(facts.spectra_of(method), method.max_rank(facts.spec)))

    def settings(self, context):
        return {"energy": self.energy(context)}


class VBMFCriterion(PerLayerCriterion):
    name = "vbmf"

    def ranks(self, facts, method, context):
        return kernel_vbmf_ranks(method, facts.spec, facts.weight, context.config.weakening,
                                 spectra=facts.spectra_of(method))

    def settings(self, context):
        return {"weakening": context.config.weakening}


class BudgetCriterion(Criterion):
    """A whole-model MACs/params ratio, spread by :func:`convfactor.rank.budget.allocate`."""

    name = "budget"
    needs = ("macs", "params")

    def __call__(self, layers: Sequence[LayerFacts], context: PlanContext) -> dict[str, LayerPlan]:
        metric, ratio, tolerance = context.target.kind, context.target.value, context.config.tolerance
        total = context.totals.macs if metric == "macs" else context.totals.params
        cands = [candidates_for(f.name, f.methods[0], f.spec, f.weight, f.size, metric, f.batch,
                                context.config.round_to, spectra=f.spectra_of(f.methods[0])) for f in layers]
        fixed = total - sum(c.cost[0] for c in cands)
        achieved, ok = allocate(cands, ratio * total - fixed, tolerance=tolerance * ratio * total / 4,
                                overshoot=0.9 * tolerance * ratio * total)
        achieved_ratio = (fixed + achieved) / max(1, total)
        within = abs(achieved_ratio - ratio) <= tolerance * ratio
        message = None
        if not ok:
            message = (f"{metric}={ratio:.3g} is unreachable with these layers/methods; the smallest "
                       f"plan keeps {achieved_ratio:.3g} of the model's {metric}")
        elif not within:
            message = f"landed at {achieved_ratio:.4g}, outside +-{tolerance:.0%} of {ratio:.4g}"
        context.plan.summary.update(requested_ratio=ratio, metric=metric, achieved_ratio=achieved_ratio,
                                    reachable=bool(ok and within), message=message)
        chosen = {}
        for f, c in zip(layers, cands):
            ranks = c.states[c.current]
            chosen[f.name] = f.layer_plan(f.methods[0] if ranks else None, ranks, self.name,
                                          error=c.error[c.current] if ranks else None)
        return chosen

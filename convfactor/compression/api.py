"""The high-level API: :func:`factorize` one layer, :func:`compress` a model by rules."""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..methods.base import Cost, Factorized, Method, Ranks
from ..methods.data_aware import DataAwareSettings, factorize_data_aware
from ..spec.convspec import ConvSpec, UnsupportedLayer
from ..utils import eval_mode
from .calibration import collect_inputs
from .surgery import Rule, configure, parse_rules, select, set_submodule

__all__ = ["factorize", "compress", "LayerReport", "CompressionReport", "check_finite", "relative_error",
           "capture_layer_io"]


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} contains NaN or Inf values")


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` (Frobenius), computed in float64."""
    exact = exact.detach().double()
    denom = exact.norm().item()
    diff = (approx.detach().double() - exact).norm().item()
    return diff / denom if denom > 0 else diff


def factorize(layer: nn.Module, method: str | Method, *, rank=None, macs_ratio: float | None = None,
              energy: float | None = None, input_size: Sequence[int] | None = None, calibration=None,
              **options) -> Factorized:
    """A drop-in low-rank replacement for ``layer`` (an ``nn.Conv1d/2d/3d`` or ``nn.Linear``).

    Exactly one target: ``rank`` (int, or a tuple for methods with several ranks), ``macs_ratio``
    in (0, 1] (layer MACs after / before, at spatial ``input_size``; a nominal size otherwise) or
    ``energy`` in (0, 1] (fraction of squared singular values kept).  ``options`` configure the
    method (e.g. ``splits=`` for ``basis``: ``registry.get(method, **options)``); with
    ``calibration=`` (the layer's inputs) the layer is fitted to its responses, and ``options`` may
    also hold :class:`~convfactor.methods.data_aware.DataAwareSettings` keys.

    The original layer is not modified; the replacement has its dtype and device.
    """
    m, settings = configure(method, options, data_aware=calibration is not None)
    if m.joint:
        raise ValueError(f"{m.name}: share= groups several layers; give it in a compress rule, not to factorize()")
    spec = ConvSpec.from_module(layer)
    m.check(spec)
    _check_layer(layer, "weight")
    ranks = m.resolve_ranks(spec, layer.weight.detach(), rank=rank, macs_ratio=macs_ratio, energy=energy,
                            input_size=input_size)
    return _replacement(layer, m, spec, ranks, calibration, settings)


def _check_layer(layer: nn.Module, what: str) -> None:
    """NaN / Inf in the layer's weight or bias is refused (``what`` names the weight in messages)."""
    check_finite(layer.weight, what)
    if layer.bias is not None:
        check_finite(layer.bias, what.replace("weight", "bias"))


def _replacement(layer: nn.Module, method: Method, spec: ConvSpec, ranks: Ranks, calibration=None,
                 settings: DataAwareSettings | None = None) -> Factorized:
    """Factorize ``layer`` at resolved ``ranks``: weight-only, or fitted on ``calibration`` inputs."""
    if calibration is not None:
        return factorize_data_aware(layer, method, spec, ranks, calibration, settings or DataAwareSettings())
    weight = layer.weight.detach()
    factors = method.factorize(weight.to(torch.float64), spec, ranks)
    if layer.bias is not None:
        factors["bias"] = layer.bias.detach()
    return method.build(spec, ranks, factors, dtype=weight.dtype, device=weight.device)


@dataclass
class LayerReport:
    name: str
    method: str | None
    ranks: tuple[int, ...] | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    weight_error: float | None = None
    output_error: float | None = None
    skipped: str | None = None          # reason, when the layer was left as it was

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0


@dataclass
class CompressionReport:
    layers: list[LayerReport] = field(default_factory=list)
    input_shape: tuple[int, ...] | None = None

    @property
    def compressed(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.skipped is None]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.skipped is not None]

    def totals(self) -> dict[str, int]:
        keys = ("params_before", "params_after", "macs_before", "macs_after")
        return {k: sum(getattr(layer, k) for layer in self.layers) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape) if self.input_shape else None,
                "layers": [asdict(layer) for layer in self.layers], "totals": self.totals()}

    def table(self) -> str:
        """A plain-text per-layer table (MACs are multiply-accumulates at ``input_shape``)."""
        head = f"{'layer':<28} {'method':<12} {'ranks':<10} {'params':>17} {'MACs':>21} {'w.err':>7} {'out.err':>7}"
        lines = [head, "-" * len(head)]
        for L in self.layers:
            ranks = ",".join(map(str, L.ranks)) if L.ranks else "-"
            params = f"{_si(L.params_before)}->{_si(L.params_after)}"
            macs = f"{_si(L.macs_before)}->{_si(L.macs_after)}"
            werr = f"{L.weight_error:.4f}" if L.weight_error is not None else "-"
            oerr = f"{L.output_error:.4f}" if L.output_error is not None else "-"
            lines.append(f"{L.name[:28]:<28} {(L.method or '-'):<12} {ranks:<10} {params:>17} {macs:>21} {werr:>7} {oerr:>7}"
                         + (f"  skipped: {L.skipped}" if L.skipped else ""))
        t = self.totals()
        lines.append("-" * len(head))
        lines.append(f"{'total (selected layers)':<52} {_si(t['params_before'])}->{_si(t['params_after'])} "
                     f"({t['params_after'] / max(1, t['params_before']):.3f})   MACs "
                     f"{_si(t['macs_before'])}->{_si(t['macs_after'])} ({t['macs_after'] / max(1, t['macs_before']):.3f})")
        return "\n".join(lines)


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _as_tuple_input(example_input) -> tuple:
    return example_input if isinstance(example_input, tuple) else (example_input,)


@torch.no_grad()
def capture_layer_io(model: nn.Module, names: Iterable[str], example_input) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model`` once (in eval mode) and return ``name -> (input, output)`` of each named layer."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name in names:
        layer = model.get_submodule(name)

        def hook(mod, args, out, name=name):
            captured.setdefault(name, (args[0].detach(), out.detach()))
        handles.append(layer.register_forward_hook(hook))
    try:
        with eval_mode(model):
            model(*_as_tuple_input(example_input))
    finally:
        for h in handles:
            h.remove()
    return captured


@dataclass
class _LayerPlan:
    """One selected layer with its rule, its spatial input size and its resolved ranks."""

    name: str
    rule: Rule
    layer: nn.Module
    spec: ConvSpec
    size: tuple[int, ...]
    ranks: Ranks

    @property
    def method(self) -> Method:
        return self.rule.method


def compress(model: nn.Module, rules: list[dict] | dict, example_input=None, *, calibration=None,
             progress: bool = False) -> tuple[nn.Module, CompressionReport]:
    """Factorize the layers selected by ``rules`` in a deep copy of ``model``.

    ``rules`` (NNI style, see :mod:`convfactor.compression.surgery`) pick layers and give each a method
    and one target.  ``example_input`` (a tensor or a tuple of them) sets the spatial sizes for
    MACs and ``macs_ratio`` targets, and gives each layer's relative output error.  Layers no rule
    selects, and layers skipped with a reason, stay bit-identical.  ``model`` is never modified.

    ``calibration``: batches of model inputs for rules with ``data_aware: true``.
    Rules with ``share`` (``basis``: ``'block' | 'group' | 'network' | [[names...], ...]``) factorize
    their layers jointly, one shared tensor per group (see :mod:`convfactor.methods.basis`).
    """
    parsed = parse_rules(rules)
    work = copy.deepcopy(model)
    chosen = select(work, parsed)
    io = capture_layer_io(work, chosen, example_input) if example_input is not None else {}
    report = CompressionReport(input_shape=tuple(_as_tuple_input(example_input)[0].shape)
                               if example_input is not None else None)
    # Every layer's ranks first: a bad target fails before any factorization.
    plans = _plan_layers(work, chosen, io, report)
    calibration_inputs = _calibration_inputs(work, plans, calibration)
    shared = _factorize_shared(plans)
    counted: set[int] = set()
    for plan in _progress(plans, progress):
        if plan.name in shared:
            new = shared[plan.name]
        else:
            new = _replacement(plan.layer, plan.method, plan.spec, plan.ranks, calibration_inputs.get(plan.name),
                               plan.rule.data_aware)
        set_submodule(work, plan.name, new)
        report.layers.append(_layer_report(plan, new, io.get(plan.name), counted if plan.name in shared else None))
    order = {name: i for i, (name, _) in enumerate(work.named_modules())}
    report.layers.sort(key=lambda L: order.get(L.name, math.inf))
    return work, report


def _plan_layers(work: nn.Module, chosen: dict[str, Rule], io: dict, report: CompressionReport) -> list[_LayerPlan]:
    """Resolve each chosen layer's ranks; a layer its method cannot handle goes to ``report`` as skipped."""
    plans = []
    for name, rule in chosen.items():
        layer = work.get_submodule(name)
        spec = ConvSpec.from_module(layer)
        size = tuple(io[name][0].shape[2:]) if name in io and not spec.is_linear else ()
        try:
            rule.method.check(spec)
        except UnsupportedLayer as exc:
            dense = (spec.dense_params(), spec.dense_params(), spec.dense_macs(size), spec.dense_macs(size))
            report.layers.append(LayerReport(name, rule.method.name, None, *dense, skipped=str(exc)))
            continue
        _check_layer(layer, f"{name}.weight")
        try:
            ranks = rule.method.resolve_ranks(spec, layer.weight.detach(), input_size=size or None,
                                              **rule.target.as_kwargs())
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        plans.append(_LayerPlan(name, rule, layer, spec, size, ranks))
    return plans


def _calibration_inputs(work: nn.Module, plans: list[_LayerPlan], calibration) -> dict[str, torch.Tensor]:
    """The inputs of every layer whose rule has ``data_aware: true``, on ``calibration`` batches."""
    names = [p.name for p in plans if p.rule.data_aware is not None]
    if not names:
        return {}
    if calibration is None:
        raise ValueError("rules with data_aware: true need calibration= batches")
    return collect_inputs(work, names, calibration)


def _progress(plans: list[_LayerPlan], show: bool):
    if not show:
        return plans
    from tqdm.auto import tqdm          # optional dependency
    return tqdm(plans, desc="factorizing", unit="layer")


def _layer_report(plan: _LayerPlan, new: Factorized, io_pair, counted: set[int] | None) -> LayerReport:
    """Params, MACs and errors of one replaced layer.  ``counted``: ids of tensors already counted for
    an earlier layer sharing them (e.g. a filter basis), so each is counted once; None when unshared."""
    method, spec, size = plan.method, plan.spec, plan.size
    after = method.cost(spec, plan.ranks, size)
    if counted is not None:
        after = Cost(sum(p.numel() for p in new.parameters() if id(p) not in counted), after.macs)
        counted.update(id(p) for p in new.parameters())
    weight_err = relative_error(method.reconstruct(method.factors_of(new), spec), plan.layer.weight)
    out_err = None
    if io_pair is not None:
        with torch.no_grad():
            out_err = relative_error(new(io_pair[0]), io_pair[1])
    return LayerReport(plan.name, method.name, tuple(plan.ranks), spec.dense_params(), after.params,
                       spec.dense_macs(size), after.macs, weight_err, out_err)


def _factorize_shared(plans: list[_LayerPlan]) -> dict[str, nn.Module]:
    """Layers of rules whose method fits them jointly (:attr:`Method.joint`, e.g. ``basis`` with
    ``share``): one :meth:`Method.factorize_shared` call per rule -> ``{name: module}``."""
    by_rule: dict[int, list[_LayerPlan]] = {}
    for plan in plans:
        if plan.method.joint:
            by_rule.setdefault(plan.rule.index, []).append(plan)
    out: dict[str, nn.Module] = {}
    for group in by_rule.values():
        method = group[0].method
        out.update(method.factorize_shared({p.name: p.layer for p in group}, {p.name: p.ranks for p in group}))
    return out

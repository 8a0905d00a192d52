"""The high-level API: :func:`factorize` one layer, :func:`compress` a model by rules."""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..methods import registry
from ..methods.base import Factorized, Method
from ..spec.convspec import ConvSpec, UnsupportedLayer
from .surgery import parse_rules, select, set_submodule

__all__ = ["factorize", "compress", "LayerReport", "CompressionReport", "check_finite", "relative_error"]


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} contains NaN or Inf values")


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` (Frobenius), computed in float64."""
    exact = exact.detach().double()
    denom = exact.norm().item()
    diff = (approx.detach().double() - exact).norm().item()
    return diff / denom if denom > 0 else diff


def rank_options(method: Method, options: dict) -> dict:
    """The options a method's rank arithmetic depends on (its ``rank_options``, e.g. TT's mode shapes)."""
    return {k: options[k] for k in getattr(method, "rank_options", ()) if k in options}


def factorize(layer: nn.Module, method: str | Method, *, rank=None, macs_ratio: float | None = None,
              energy: float | None = None, input_size: Sequence[int] | None = None, **options) -> Factorized:
    """A drop-in low-rank replacement for ``layer`` (an ``nn.Conv1d/2d/3d`` or ``nn.Linear``).

    Exactly one target: ``rank`` (int, or a tuple for methods with several ranks), ``macs_ratio``
    in (0, 1] (layer MACs after / before, at spatial ``input_size``; a nominal size otherwise) or
    ``energy`` in (0, 1] (fraction of squared singular values kept).  ``options`` go to the
    method (e.g. ``splits=`` for ``basis``, ``calibration=`` for data-aware fitting).

    The original layer is not modified; the replacement has its dtype and device.
    """
    m = registry.get(method)
    spec = ConvSpec.from_module(layer)
    m.check(spec)
    weight = layer.weight.detach()
    check_finite(weight, "weight")
    if layer.bias is not None:
        check_finite(layer.bias, "bias")
    ranks = m.resolve_ranks(spec, weight, rank=rank, macs_ratio=macs_ratio, energy=energy, input_size=input_size,
                            **rank_options(m, options))
    if options.get("calibration") is not None:   # data-aware (response) fitting, issue 7
        from ..methods.data_aware import factorize_data_aware
        return factorize_data_aware(layer, m, spec, ranks, **options)
    factors = m.factorize(weight.to(torch.float64), spec, ranks, **options)
    if layer.bias is not None:
        factors["bias"] = layer.bias.detach()
    module = m.build(spec, ranks, factors, dtype=weight.dtype, device=weight.device, **options)
    module.options.update(m.options_for_recipe(options))
    return module


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
    """Run ``model`` once and return ``name -> (input, output)`` of each named layer."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name in names:
        layer = model.get_submodule(name)

        def hook(mod, args, out, name=name):
            captured.setdefault(name, (args[0].detach(), out.detach()))
        handles.append(layer.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(*_as_tuple_input(example_input))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return captured


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
    report = CompressionReport(input_shape=tuple(_as_tuple_input(example_input)[0].shape) if example_input is not None else None)

    # Resolve every layer's method and ranks first: a bad target fails before any factorization.
    plans = []
    for name, rule in chosen.items():
        layer = work.get_submodule(name)
        spec = ConvSpec.from_module(layer)
        size = tuple(io[name][0].shape[2:]) if name in io and not spec.is_linear else ()
        method = registry.get(rule.method)
        try:
            method.check(spec)
        except UnsupportedLayer as exc:
            report.layers.append(LayerReport(name, rule.method, None, spec.dense_params(), spec.dense_params(),
                                             spec.dense_macs(size), spec.dense_macs(size), skipped=str(exc)))
            continue
        check_finite(layer.weight, f"{name}.weight")
        try:
            ranks = method.resolve_ranks(spec, layer.weight.detach(), input_size=size or None, **rule.target,
                                         **rank_options(method, rule.options))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        plans.append((name, rule, layer, spec, size, method, ranks))

    data_aware_layers = [p[0] for p in plans if p[1].options.get("data_aware")]
    calib_io = {}
    if data_aware_layers:
        if calibration is None:
            raise ValueError("rules with data_aware: true need calibration= batches")
        from .calibration import collect_inputs  # provided by the data-aware feature
        calib_io = collect_inputs(work, data_aware_layers, calibration)

    shared = _factorize_shared(plans)
    seen_shared: set[int] = set()
    iterator = plans
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(plans, desc="factorizing", unit="layer")
    for name, rule, layer, spec, size, method, ranks in iterator:
        options = dict(rule.options)
        if options.pop("data_aware", False):
            options["calibration"] = calib_io[name]
        new = shared[name] if name in shared else factorize(layer, method, rank=ranks, input_size=size or None,
                                                            **options)
        set_submodule(work, name, new)
        before, after = spec.dense_params(), method.cost(spec, ranks, size, **rank_options(method, rule.options))
        if name in shared:   # a tensor shared with an earlier layer (e.g. a filter basis) is counted there, once
            after = type(after)(sum(p.numel() for p in new.parameters() if id(p) not in seen_shared), after.macs)
            seen_shared.update(id(p) for p in new.parameters())
        weight_err = relative_error(method.reconstruct(_module_factors(new, method, spec), spec), layer.weight)
        out_err = None
        if name in io:
            x, y = io[name]
            with torch.no_grad():
                out_err = relative_error(new(x), y)
        report.layers.append(LayerReport(name, method.name, tuple(ranks), before, after.params,
                                         spec.dense_macs(size), after.macs, weight_err, out_err))
    order = {name: i for i, name in enumerate(n for n, _ in work.named_modules())}
    report.layers.sort(key=lambda L: order.get(L.name, math.inf))
    return work, report


def _factorize_shared(plans: list) -> dict[str, nn.Module]:
    """Rules with a ``share`` option: their method builds all of the rule's layers jointly through
    ``method.factorize_shared(layers: {name: layer}, ranks: {name: ranks}, **options) -> {name: module}``
    (e.g. ``basis`` with one filter basis per block / group / network)."""
    by_rule: dict[int, list] = {}
    for name, rule, layer, spec, size, method, ranks in plans:
        if rule.options.get("share") is not None:
            by_rule.setdefault(rule.index, []).append((name, rule, layer, method, ranks))
    out: dict[str, nn.Module] = {}
    for group in by_rule.values():
        rule, method = group[0][1], group[0][3]
        if not hasattr(method, "factorize_shared"):
            raise ValueError(f"rule {rule.index}: method {method.name!r} does not support 'share'")
        options = {k: v for k, v in rule.options.items() if k != "data_aware"}
        out.update(method.factorize_shared({g[0]: g[2] for g in group}, {g[0]: g[4] for g in group}, **options))
    return out


def _module_factors(module: Factorized, method: Method, spec: ConvSpec) -> dict[str, torch.Tensor]:
    """Factor tensors read back from a built module (what it really computes)."""
    extract = getattr(method, "factors_of", None)
    if extract is not None:
        return extract(module)
    from ..spec.convspec import conv_of
    convs = [conv_of(p) for p in module]
    names = getattr(method, "factor_names", None) or [f"f{i}" for i in range(len(convs))]
    return {n: c.weight.detach().double() for n, c in zip(names, convs)}

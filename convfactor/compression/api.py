"""The high-level API: :func:`factorize` one layer, :func:`compress` a model by rules.

:func:`compress` never aborts a model because of one layer: a layer that cannot be handled -- its
method does not support it, its parent reads its parameters (:mod:`.safety`), a whole-model target
is out of its reach, or its method raises -- is left dense and reported with the reason.  Bad
input (rules, NaN weights) and explicit per-layer requests that cannot be met
(:func:`~convfactor.compression.surgery.is_explicit`) still raise a ValueError.
"""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..methods.base import Cost, Factorized, Method, Ranks, default_input_size
from ..methods.data_aware import DataAwareSettings, factorize_data_aware, fit_note
from ..spec.convspec import ConvSpec, SamePad, UnsupportedLayer
from ..utils import as_inputs, eval_mode, format_si
from .batchnorm import accepted_layers, check_fold_mode, fold_batchnorm
from .calibration import as_batches, clone_tree, collect_input_pairs, collect_inputs, probe_layers
from .merge import MergeReport, MergeSettings, merge as merge_chains
from .safety import seeded, unsafe_layers
from .surgery import Rule, configure, is_explicit, layer_problems, own_problem, parse_rules, select, set_submodule
from .timing import WARN_SECONDS, estimate_seconds

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

    The original layer is not modified; the replacement has its dtype and device.  A layer that
    cannot be replaced exactly (:func:`~convfactor.compression.surgery.own_problem`, e.g. timm's
    ``StdConv2d``) raises :class:`~convfactor.spec.convspec.UnsupportedLayer`.
    """
    m, settings = configure(method, options, data_aware=calibration is not None)
    if m.joint:
        raise ValueError(f"{m.name}: share= groups several layers; give it in a compress rule, not to factorize()")
    spec = ConvSpec.from_module(layer)
    problem = own_problem(layer)
    if problem:
        raise UnsupportedLayer(problem)
    m.check(spec)
    _check_layer(layer, "weight")
    ranks = m.resolve_ranks(spec, layer.weight.detach(), rank=rank, macs_ratio=macs_ratio, energy=energy,
                            input_size=input_size)
    new = _replacement(layer, m, spec, ranks, calibration, settings)
    _check_replacement(spec, new, m.name)
    return new


def _check_layer(layer: nn.Module, what: str) -> None:
    """NaN / Inf in the layer's weight or bias is refused (``what`` names the weight in messages)."""
    check_finite(layer.weight, what)
    if layer.bias is not None:
        check_finite(layer.bias, what.replace("weight", "bias"))


def _replacement(layer: nn.Module, method: Method, spec: ConvSpec, ranks: Ranks, calibration=None,
                 settings: DataAwareSettings | None = None, targets=None) -> Factorized:
    """Factorize ``layer`` at resolved ``ranks``: weight-only, or fitted on ``calibration`` inputs (to its
    responses to ``targets``, the original network's inputs, when given)."""
    if calibration is not None:
        return factorize_data_aware(layer, method, spec, ranks, calibration, settings or DataAwareSettings(),
                                    targets=targets)
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
    note: str | None = None             # e.g. a data-aware fit that fell back to the weight-only one

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0


@dataclass
class CompressionReport:
    """Per selected layer: what was done, or why it was skipped.  MACs are per sample at
    ``input_shape`` (a Linear's once per token: its input's numel / in_features, per sample).
    ``notes``: what the caller should know about the run (a check that could not run, a long wait)."""

    layers: list[LayerReport] = field(default_factory=list)
    input_shape: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)
    merge: MergeReport | None = None    # the exact merges done after factorizing (compress(merge=True))

    @property
    def compressed(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.skipped is None]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.skipped is not None]

    @property
    def warning(self) -> str | None:
        """A one-line warning when the rules selected layers but none was compressed, else None."""
        if self.compressed:
            return None
        return (f"nothing was compressed: all {len(self.layers)} selected layers were skipped "
                f"(e.g. {self.layers[0].name}: {self.layers[0].skipped})" if self.layers else
                "nothing was compressed: no layer was selected")

    def totals(self) -> dict[str, int]:
        keys = ("params_before", "params_after", "macs_before", "macs_after")
        return {k: sum(getattr(layer, k) for layer in self.layers) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape) if self.input_shape else None,
                "layers": [asdict(layer) for layer in self.layers], "totals": self.totals(),
                "notes": list(self.notes), "warning": self.warning,
                "merge": self.merge.to_dict() if self.merge is not None else None}

    def table(self) -> str:
        """A plain-text per-layer table (MACs are multiply-accumulates at ``input_shape``)."""
        head = f"{'layer':<28} {'method':<12} {'ranks':<10} {'params':>17} {'MACs':>21} {'w.err':>7} {'out.err':>7}"
        lines = [head, "-" * len(head)]
        for L in self.layers:
            ranks = ",".join(map(str, L.ranks)) if L.ranks else "-"
            params = f"{format_si(L.params_before)}->{format_si(L.params_after)}"
            macs = f"{format_si(L.macs_before)}->{format_si(L.macs_after)}"
            werr = f"{L.weight_error:.4f}" if L.weight_error is not None else "-"
            oerr = f"{L.output_error:.4f}" if L.output_error is not None else "-"
            lines.append(f"{L.name[:28]:<28} {(L.method or '-'):<12} {ranks:<10} {params:>17} {macs:>21} {werr:>7} {oerr:>7}"
                         + (f"  skipped: {L.skipped}" if L.skipped else "") + (f"  note: {L.note}" if L.note else ""))
        t = self.totals()
        lines.append("-" * len(head))
        lines.append(f"{'total (selected layers)':<52} {format_si(t['params_before'])}->{format_si(t['params_after'])} "
                     f"({t['params_after'] / max(1, t['params_before']):.3f})   MACs "
                     f"{format_si(t['macs_before'])}->{format_si(t['macs_after'])} "
                     f"({t['macs_after'] / max(1, t['macs_before']):.3f})")
        lines += [f"note: {note}" for note in self.notes] + ([f"warning: {self.warning}"] if self.warning else [])
        if self.merge is not None and self.merge.merged:
            lines += ["merging linear chains (exact):", self.merge.table()]
        elif self.merge is not None and self.merge.skipped:
            first = self.merge.skipped[0]
            lines.append(f"merge: nothing merged ({len(self.merge.skipped)} adjacent pairs left as they are, e.g. "
                         f"{' + '.join(first.paths)}: {first.reason})")
        return "\n".join(lines)


@torch.no_grad()
def _capture(model: nn.Module, names: Iterable[str], example_input) -> tuple[dict, Any]:
    """Run ``model`` once in eval mode on a copy of ``example_input`` -> (``{name: (input, output)}``
    of each named layer's first call, copied; the model's output)."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name in names:
        layer = model.get_submodule(name)

        def hook(mod, args, out, name=name):
            if name not in captured and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                captured[name] = (args[0].detach().clone(), out.detach().clone())
        handles.append(layer.register_forward_hook(hook))
    try:
        with eval_mode(model), seeded():
            output = model(*clone_tree(as_inputs(example_input)))
    finally:
        for h in handles:
            h.remove()
    return captured, output


def capture_layer_io(model: nn.Module, names: Iterable[str], example_input) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model`` once (in eval mode, on a copy of ``example_input``, which is never modified) and
    return ``name -> (input, output)`` of each named layer (copies of its first call)."""
    return _capture(model, names, example_input)[0]


@dataclass
class _LayerPlan:
    """One selected layer with its rule, its spatial input size, its token count and resolved ranks.

    ``tokens``: how many times per sample a Linear is applied (its input's numel / in_features per
    sample, e.g. H*W for ConvNeXt's MLP on (B, H, W, C)); 1 for convs, whose ``size`` counts."""

    name: str
    rule: Rule
    layer: nn.Module
    spec: ConvSpec
    size: tuple[int, ...]
    ranks: Ranks
    tokens: int = 1

    @property
    def method(self) -> Method:
        return self.rule.method


def compress(model: nn.Module, rules, example_input=None, *, calibration=None,
             progress: bool | None = None, fold_bn: bool | str = True, merge: bool = True,
             keep_dense: dict[str, str] | None = None) -> tuple[nn.Module, CompressionReport]:
    """Factorize the layers selected by ``rules`` in a deep copy of ``model``.

    ``rules`` (NNI style, see :mod:`convfactor.compression.surgery`) pick layers and give each a method
    and one target; a plan (:class:`convfactor.rank.Plan`, or any object with ``.rules()``, see
    :func:`~convfactor.compression.surgery.rules_of`) works too.  ``example_input`` (a tensor or a
    tuple of them; never modified) sets the spatial sizes for MACs and ``macs_ratio`` targets, gives
    each layer's relative output error and lets the parent check of :mod:`.safety` run.  Layers no
    rule selects, and layers skipped with a reason, stay bit-identical (unless ``merge`` merges one with a
    factorized neighbour).  ``model`` is never modified.

    Raises a ValueError for bad rules, when no layer is selected, and for an explicit request that
    cannot be met; when layers were selected but all skipped, ``report.warning`` says so.

    ``calibration``: batches of model inputs for rules with ``data_aware: true``.  With their default
    ``sequential: true`` the layers are fitted in execution order, each on the inputs the
    already-compressed layers before it produce, to the original's responses (:class:`_DataFits`).
    Rules with ``share`` (``basis``: ``'block' | 'group' | 'network' | [[names...], ...]``) factorize
    their layers jointly, one shared tensor per group (see :mod:`convfactor.methods.basis`).
    ``progress``: a per-layer progress bar on stderr (None: only when stderr is a terminal).
    ``fold_bn``: fold each eval-mode BatchNorm into the selected layer it follows before factorizing
    (``True`` = ``"keep"``: the BN stays after the factorized layer, identity-initialised, so it can be
    trained again; ``"remove"``: it becomes an identity; ``False``: no folding), see
    :mod:`convfactor.compression.batchnorm`; ``report.notes`` says what was folded and why a BN was not.
    ``merge``: then merge adjacent linear layers exactly where that lowers the MACs
    (:func:`convfactor.compression.merge.merge`), only in groups that include a factorized layer (so
    layers no rule selects stay as they were unless merged with one); ``report.merge`` says what was
    merged and why a pair was not.  ``merge=False`` keeps every factorized layer as its method built it.
    ``keep_dense``: ``{layer name: reason}`` of layers to leave dense even where a rule selects them
    (e.g. the CLI's image-facing convs); each one a rule selects is reported skipped with its reason.
    """
    check_fold_mode(fold_bn)
    parsed = parse_rules(rules)
    work = copy.deepcopy(model)
    chosen = select(work, parsed)
    report = CompressionReport(input_shape=tuple(as_inputs(example_input)[0].shape)
                               if example_input is not None else None)
    problems = layer_problems(work, {n: work.get_submodule(n) for n in chosen})
    problems.update({n: reason for n, reason in (keep_dense or {}).items() if n in chosen and n not in problems})
    kept = {n: r for n, r in chosen.items() if n not in problems}
    folds = fold_batchnorm(work, example_input, layers=accepted_layers(work, kept), mode=fold_bn)
    report.notes += folds.notes()
    io, output = _capture(work, chosen, example_input) if example_input is not None else ({}, None)
    _report_skipped(work, chosen, problems, io, report)
    chosen = _skip_unsafe(work, kept, example_input, output, io, report)
    # Every layer's ranks first: a bad explicit target fails before any factorization.
    plans = _plan_layers(work, chosen, io, report)
    fits = _DataFits(work, plans, calibration)
    _warn_if_slow(plans, report)
    _factorize_layers(work, fits.in_order(plans), io, fits, report, progress)
    order = {name: i for i, (name, _) in enumerate(work.named_modules())}
    report.layers.sort(key=lambda L: order.get(L.name, math.inf))
    if merge and report.compressed:
        settings = MergeSettings(within=tuple(layer.name for layer in report.compressed))
        work, report.merge = merge_chains(work, example_input, inplace=True, settings=settings)
    return work, report


def _skipped(name: str, rule: Rule, layer: nn.Module, reason: str, size=(), tokens: int = 1) -> LayerReport:
    """The report of a layer left dense (its dense params and MACs on both sides)."""
    try:
        spec = ConvSpec.from_module(layer)
        params, macs = spec.dense_params(), spec.dense_macs(size) * tokens
    except (ValueError, TypeError, AttributeError):
        params, macs = sum(p.numel() for p in layer.parameters()), 0
    return LayerReport(name, rule.method.name if rule.method else None, None, params, params, macs, macs,
                       skipped=reason)


def _report_skipped(work: nn.Module, chosen: dict[str, Rule], reasons: dict[str, str], io: dict,
                    report: CompressionReport) -> None:
    """Add the layers of ``reasons`` to ``report`` as skipped, with their MACs at the captured sizes."""
    batch = report.input_shape[0] if report.input_shape else 1
    for name, reason in reasons.items():
        layer = work.get_submodule(name)
        size, tokens = (), 1
        if name in io:
            try:
                spec = ConvSpec.from_module(layer)
                size = () if spec.is_linear else tuple(io[name][0].shape[2:])
                tokens = tokens_per_sample(spec, io[name], batch)
            except (ValueError, TypeError, AttributeError):
                pass
        report.layers.append(_skipped(name, chosen[name], layer, reason, size, tokens))


def _skip_unsafe(work: nn.Module, chosen: dict[str, Rule], example_input, output, io: dict,
                 report: CompressionReport) -> dict[str, Rule]:
    """Drop (and report) the layers whose parent would break once they are replaced (:mod:`.safety`)."""
    if not chosen:
        return chosen
    if example_input is None:
        report.notes.append("the parent check did not run (no example input): only layers known up front "
                            "(nn.MultiheadAttention's out_proj) were skipped for being read by their parent")
        return chosen
    unsafe = unsafe_layers(work, list(chosen), as_inputs(example_input), output)
    _report_skipped(work, chosen, unsafe, io, report)
    return {n: r for n, r in chosen.items() if n not in unsafe}


def tokens_per_sample(spec: ConvSpec, io_pair, batch: int) -> int:
    """Applications of a Linear per sample (1 for a conv): its input's numel / in_features / batch."""
    if not spec.is_linear or io_pair is None:
        return 1
    return max(1, io_pair[0].numel() // max(1, spec.in_channels) // max(1, batch))


def _plan_layers(work: nn.Module, chosen: dict[str, Rule], io: dict, report: CompressionReport) -> list[_LayerPlan]:
    """Resolve each chosen layer's ranks; a layer that cannot be handled goes to ``report`` as skipped,
    unless the request is explicit (:func:`~.surgery.is_explicit`) and its target is out of range."""
    plans = []
    batch = report.input_shape[0] if report.input_shape else 1
    for name, rule in chosen.items():
        layer = work.get_submodule(name)
        spec = ConvSpec.from_module(layer)
        size = tuple(io[name][0].shape[2:]) if name in io and not spec.is_linear else ()
        tokens = tokens_per_sample(spec, io.get(name), batch)
        _check_layer(layer, f"{name}.weight")
        try:
            ranks = _resolve(rule, spec, layer, size)
        except _Skip as exc:
            report.layers.append(_skipped(name, rule, layer, str(exc), size, tokens))
            continue
        except ValueError as exc:
            if is_explicit(rule, name):
                raise ValueError(f"{name}: {exc}") from None
            report.layers.append(_skipped(name, rule, layer, f"{exc} (whole-model target; skipped)", size, tokens))
            continue
        plans.append(_LayerPlan(name, rule, layer, spec, size, ranks, tokens))
    return plans


class _Skip(Exception):
    """A layer to leave dense, with the reason."""


def _resolve(rule: Rule, spec: ConvSpec, layer: nn.Module, size: tuple[int, ...]) -> Ranks:
    """``rule``'s target as ranks for ``layer``; :class:`_Skip` when the layer cannot be handled,
    ValueError when its target is out of range."""
    try:
        rule.method.check(spec)
    except UnsupportedLayer as exc:
        raise _Skip(str(exc)) from None
    if spec.dynamic_same and rule.data_aware is not None:
        raise _Skip("data-aware fitting does not handle dynamic 'SAME' padding (timm's Conv2dSame); "
                    "use a weight-only rule for this layer")
    try:
        ranks = rule.method.resolve_ranks(spec, layer.weight.detach(), input_size=size or None,
                                          **rule.target.as_kwargs())
    except ValueError:
        raise
    except Exception as exc:         # noqa: BLE001 - a method failing on one layer never aborts the model
        raise _Skip(f"{rule.method.name} failed: {_describe(exc)}") from None
    if rule.target.energy is not None and float(rule.target.energy) < 1:     # energy=1: exact, as asked
        _check_energy_cuts_macs(rule.method, spec, layer.weight.detach(), ranks, rule.target.energy, size)
    return ranks


def _check_energy_cuts_macs(method: Method, spec: ConvSpec, weight: torch.Tensor, ranks: Ranks, energy: float,
                           size: tuple[int, ...] = ()) -> None:
    """The speed bound for an ``energy`` target: nothing when ``ranks`` (the smallest keeping ``energy``
    of each spectrum) cost fewer MACs than the dense layer, else :class:`_Skip` with the reason.

    MACs grow with every rank, so no smaller ranks keep the energy either: the layer stays dense.  The
    reason names the largest ranks that do cut MACs (the speed bound, each rank capped at it) and the
    energy they keep, for a ``rank=`` request that accepts the loss.  (``energy=1`` asks for an exact
    factorization, not a cheaper one, and is not checked here.)"""
    size = tuple(size) or default_input_size(spec)
    dense = spec.dense_macs(size)
    macs = method.cost(spec, tuple(ranks), size).macs
    if macs < dense or dense <= 0:
        return
    reason = (f"energy={energy:g} needs {method.name} ranks {list(ranks)}, {format_si(macs)} MACs, which do not "
              f"cut the dense {format_si(dense)}")
    cap = _speed_bound(method, spec, ranks, size)
    if cap is None:
        raise _Skip(f"{reason}, and no rank does; kept dense")
    spectra = method.spectra(weight.double(), spec)
    kept = min(_kept(s, r) for s, r in zip(spectra, cap))
    rank = cap[0] if len(cap) == 1 else tuple(cap)
    raise _Skip(f"{reason}; the largest that do, {list(cap)}, keep only {kept:.3f} of the energy (ask for "
                f"rank={rank} to accept that); kept dense")


def _speed_bound(method: Method, spec: ConvSpec, ranks: Ranks, size: tuple[int, ...]) -> Ranks | None:
    """``ranks`` capped to the largest that cut the dense MACs at ``size``: each rank at most the
    largest member of the method's ``macs_ratio`` family below dense; None when even rank 1 is not."""
    dense = spec.dense_macs(size)
    try:
        bound = method.ranks_for_macs(spec, (dense - 0.5) / dense, size)     # MACs are ints: < dense
    except ValueError:
        return None
    capped = tuple(min(r, b) for r, b in zip(ranks, bound))
    return capped if method.cost(spec, capped, size).macs < dense else tuple(bound)


def _kept(spectrum: torch.Tensor, rank: int) -> float:
    """The fraction of ``spectrum``'s squared singular values (all groups together) in its top ``rank``."""
    s2 = spectrum.double().pow(2).reshape(-1, spectrum.shape[-1])
    total = float(s2.sum())
    return float(s2[:, :int(rank)].sum()) / total if total > 0 else 1.0


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


class _DataFits:
    """The calibration data of the data-aware layers: collected up front for ``sequential: false``
    rules, and at each sequential layer's turn from the model as compressed so far (paired with the
    original's inputs, :func:`collect_input_pairs`); ``relu="auto"`` decided by :func:`probe_layers`."""

    def __init__(self, work: nn.Module, plans: list[_LayerPlan], calibration):
        aware = [p for p in plans if p.rule.data_aware is not None]
        self.sequential = {p.name for p in aware if p.rule.data_aware.sequential and not p.method.joint}
        self.order: list[str] = []
        self.relu_fed: set[str] = set()
        self.upfront: dict[str, torch.Tensor] = {}
        if not aware:
            return
        if calibration is None:
            raise ValueError("rules with data_aware: true need calibration= batches")
        self.batches = as_batches(calibration)
        self.order, self.relu_fed = probe_layers(work, [p.name for p in aware], self.batches[0])
        self.reference = copy.deepcopy(work) if self.sequential else None     # as it was: BN folded, nothing replaced
        rest = [p.name for p in aware if p.name not in self.sequential]
        self.upfront = collect_inputs(work, rest, self.batches) if rest else {}

    def in_order(self, plans: list[_LayerPlan]) -> list[_LayerPlan]:
        """``plans`` with the data-aware layers in execution order (a sequential fit needs its prefix done)."""
        rank = {name: i for i, name in enumerate(self.order)}
        return sorted(plans, key=lambda p: rank.get(p.name, -1))

    def settings(self, plan: _LayerPlan) -> DataAwareSettings | None:
        """The plan's data-aware settings with ``relu="auto"`` decided (never for a method fitting itself)."""
        settings = plan.rule.data_aware
        return None if settings is None else settings.resolved(plan.name in self.relu_fed
                                                                and not plan.method.uses_calibration)

    def inputs(self, work: nn.Module, plan: _LayerPlan) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(calibration inputs, the original's inputs or None)`` for ``plan``'s layer in ``work`` now."""
        if plan.name not in self.sequential:
            return self.upfront.get(plan.name), None
        original, current = collect_input_pairs(self.reference, work, plan.name, self.batches)
        return current, original


def _warn_if_slow(plans: list[_LayerPlan], report: CompressionReport) -> None:
    """Estimate the factorization time (:mod:`.timing`); above ``WARN_SECONDS``, say so on stderr."""
    if not plans:
        return
    times = sorted(((estimate_seconds(p.method, p.spec, p.ranks), p) for p in plans), key=lambda t: -t[0])
    total = sum(t for t, _ in times)
    if total <= WARN_SECONDS:
        return
    slowest = ", ".join(f"{p.name} ({p.method.name}, ~{t:.0f} s)" for t, p in times[:3])
    message = f"factorizing {len(plans)} layers may take about {total:.0f} s; the slowest: {slowest}"
    report.notes.append(message)
    print(f"convfactor: {message}", file=sys.stderr, flush=True)


def _progress(plans: list[_LayerPlan], show: bool | None):
    """``plans`` wrapped in a tqdm bar on stderr (shown when ``show``, or when None and stderr is a TTY)."""
    from tqdm.auto import tqdm
    enabled = bool(show) if show is not None else sys.stderr.isatty()
    return tqdm(plans, desc="factorizing", unit="layer", file=sys.stderr, disable=not enabled, leave=False)


def _factorize_layers(work: nn.Module, plans: list[_LayerPlan], io: dict, fits: _DataFits,
                      report: CompressionReport, progress: bool | None) -> None:
    """Factorize every planned layer (in order) and swap it in; a layer whose method fails is reported
    skipped.  ``fits`` gives each data-aware layer its calibration inputs."""
    shared, failed = _factorize_shared(plans)
    counted: set[int] = set()
    bar = _progress(plans, progress)
    for plan in bar:
        bar.set_postfix_str(f"{plan.name} ({plan.method.name})")
        try:
            if plan.name in failed:
                raise _Skip(failed[plan.name])
            if plan.name in shared:
                new = shared[plan.name]
            else:
                inputs, originals = fits.inputs(work, plan)
                new = _replacement(plan.layer, plan.method, plan.spec, plan.ranks, inputs, fits.settings(plan),
                                   targets=originals)
            _check_replacement(plan.spec, new, plan.method.name)
            entry = _layer_report(plan, new, io.get(plan.name), counted if plan.name in shared else None)
        except Exception as exc:     # noqa: BLE001 - a method failing on one layer never aborts the model
            reason = str(exc) if isinstance(exc, (_Skip, UnsupportedLayer)) else \
                f"{plan.method.name} failed: {_describe(exc)}"
            report.layers.append(_skipped(plan.name, plan.rule, plan.layer, reason, plan.size, plan.tokens))
            continue
        set_submodule(work, plan.name, new)
        report.layers.append(entry)
    bar.close()


def _check_replacement(spec: ConvSpec, new: nn.Module, method: str) -> None:
    """A layer with dynamic "SAME" padding (a kernel wider than 1) needs a replacement that pads at
    run time (:class:`SamePad`); methods that pad by themselves (basis, tt) cannot carry it."""
    if spec.dynamic_same and spec.kernel_volume > 1 and not any(isinstance(m, SamePad) for m in new.modules()):
        raise UnsupportedLayer(f"{method}: dynamic 'SAME' padding (timm's Conv2dSame) is not supported by this "
                               "method (channel_svd, spatial_svd, tucker2, cp, depthwise and lowrank_sparse carry it)")


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
                       spec.dense_macs(size) * plan.tokens, after.macs * plan.tokens, weight_err, out_err,
                       note=fit_note(new))


def _factorize_shared(plans: list[_LayerPlan]) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Layers of rules whose method fits them jointly (:attr:`Method.joint`, e.g. ``basis`` with
    ``share``): one :meth:`Method.factorize_shared` call per rule -> (``{name: module}``,
    ``{name: reason}`` of the layers of a group whose joint fit failed)."""
    by_rule: dict[int, list[_LayerPlan]] = {}
    for plan in plans:
        if plan.method.joint:
            by_rule.setdefault(plan.rule.index, []).append(plan)
    out: dict[str, nn.Module] = {}
    failed: dict[str, str] = {}
    for group in by_rule.values():
        method = group[0].method
        try:
            out.update(method.factorize_shared({p.name: p.layer for p in group}, {p.name: p.ranks for p in group}))
        except Exception as exc:     # noqa: BLE001 - a failed group leaves its layers dense
            failed.update({p.name: f"{method.name} (shared) failed: {_describe(exc)}" for p in group})
    return out, failed

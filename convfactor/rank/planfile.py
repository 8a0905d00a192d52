"""The :class:`Plan`: per layer the method, ranks, the criterion that chose them and measured numbers.

A plan is plain data.  It is saved as YAML (``.yaml``/``.yml``) or JSON (anything else), can be
edited by hand (change a rank, set ``method: null`` to keep a layer dense) and re-applied with
:meth:`Plan.apply` or ``convfactor compress MODEL --plan plan.yaml``.

A plan records the Conv/Linear layers of the model it was made for (``model_layers``: name -> weight
shape), so applying it to another model (a plan for resnet20 on resnet56) fails, naming the first
layer that differs, instead of compressing the wrong layers silently.  Plans written before this
record (version 1) are applied without the check.
"""
from __future__ import annotations

import copy
import glob
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from torch import nn

from ..compression.api import CompressionReport, compress
from ..compression.surgery import candidate_layers, conv_and_linear_layers
from ..files import atomic_write, check_output, read_structured
from ..methods.base import method_key
from ..utils import plain_data

__all__ = ["LayerPlan", "Plan", "PlanSummary", "PLAN_VERSION", "layer_signature"]

#: 2: ``model_layers`` (the planned model's layers and weight shapes)
PLAN_VERSION = 2


def layer_signature(model: nn.Module) -> dict[str, list[int]]:
    """Every Conv/Linear layer of ``model`` (those a plan may name) -> its weight shape."""
    return {name: list(layer.weight.shape) for name, layer in conv_and_linear_layers(model).items()
            if isinstance(getattr(layer, "weight", None), torch.Tensor)}


def signature_mismatch(recorded: dict[str, list[int]], actual: dict[str, list[int]]) -> str | None:
    """The first difference between a plan's recorded layers and a model's (in the model's order)."""
    for name, shape in actual.items():
        if name not in recorded:
            return f"{name} is in this model but not in the plan's"
        if list(recorded[name]) != list(shape):
            return f"{name} has weight shape {tuple(shape)} here, {tuple(recorded[name])} in the plan's model"
    missing = next((name for name in recorded if name not in actual), None)
    return None if missing is None else f"{missing} is in the plan's model but not in this one"


@dataclass
class LayerPlan:
    """One layer. ``method: None`` keeps it dense."""

    name: str
    method: str | None = None
    ranks: list[int] | None = None
    criterion: str = ""                      # what chose this: budget, energy, vbmf, latency, rank, ...
    input_shape: list[int] | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    kappa: float | None = None
    error: float | None = None               # relative kernel error (estimate or exact, see ``note``)
    dense_ms: float | None = None            # measured latency of the dense layer
    factorized_ms: float | None = None       # measured latency of the chosen candidate
    note: str | None = None
    options: dict[str, Any] | None = None    # the method's non-default options, e.g. {"slices": 4}

    def __post_init__(self):
        if self.options is not None and not isinstance(self.options, dict):
            raise ValueError(f"plan layer {self.name!r}: options must be a mapping, got {self.options!r}")
        if self.ranks is not None:
            self.ranks = [int(r) for r in self.ranks]
        if self.method is not None and not self.ranks:
            raise ValueError(f"plan layer {self.name!r}: method {self.method!r} needs ranks")

    @property
    def compressed(self) -> bool:
        return self.method is not None

    @property
    def method_key(self) -> str | None:
        """``method`` with its options, e.g. ``sliced_svd:slices=4`` (as ``--method`` takes it)."""
        return None if self.method is None else method_key(self.method, self.options)


@dataclass
class PlanSummary:
    """What was asked for and what the plan achieves; each criterion fills its own fields.

    ``requested_speedup`` is the user's request (3.0); ``aimed_speedup`` is what the latency planner
    aimed its per-layer model at (3.36 with a 12% margin) and ``speedup_band`` the measured
    speed-ups it accepted.  Read fields as attributes; ``summary["key"]`` and ``summary.get("key")``
    also work (None fields read as absent).
    """

    # the request, as the user gave it
    requested_speedup: float | None = None
    requested_error: float | None = None
    requested_ratio: float | None = None           # budget: the fraction of MACs/params kept
    metric: str | None = None                      # budget: 'macs' or 'params'
    # what the latency planner aimed at, and the measured speed-ups it accepts (low, high)
    aimed_speedup: float | None = None
    speedup_band: tuple[float, float] | None = None
    # a back-end at a lower precision: the dense model there against the dense fp32 model on the same runtime
    # (backend, baseline, speedup, interval, meets_request); low rank was asked only for the rest
    precision_credit: dict[str, Any] | None = None
    # settings that shaped the ranks
    energy: float | None = None
    weakening: float | None = None
    kappa_threshold: float | None = None
    round_to: int | None = None
    error_metric: str | None = None                # "kernel" (weight-space) or "output" (on the example's data)
    # the outcome
    reachable: bool | None = None
    message: str | None = None
    achieved_ratio: float | None = None            # budget
    measured_speedup: float | None = None          # latency: end to end, against the original's fastest form
    predicted_speedup: float | None = None
    rms_kernel_error: float | None = None
    reference_format: str | None = None
    reference_ms: float | None = None
    plan_ms: float | None = None
    original_ms: dict[str, float] | None = None    # the original model per memory format
    original_ms_cached: bool | None = None         # ``original_ms`` read from the timing cache (a warm plan)
    skipped_formats: dict[str, str] | None = None  # memory formats given no layer table, and why
    aimed_from_earlier_tries: int | None = None    # earlier tries of the same timing table that aimed this plan
    timings_cached: bool | None = None             # this plan's timings were saved to the on-disk cache (not when busy)
    layer_time_scale: dict[str, float] | None = None
    history: list[dict[str, Any]] | None = None    # latency: one record per measured try
    # whole-model costs
    macs_before: int | None = None
    macs_after: int | None = None
    macs_ratio: float | None = None
    params_before: int | None = None
    params_after: int | None = None
    params_ratio: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # keys this version does not know, kept as read

    def __post_init__(self):
        if self.speedup_band is not None:
            self.speedup_band = tuple(float(v) for v in self.speedup_band)

    def update(self, **values) -> None:
        """Set fields by name (a name that is not a field goes to ``extra``)."""
        names = _field_names(type(self))
        for key, value in values.items():
            if key in names:
                setattr(self, key, value)
            else:
                self.extra[key] = value
        self.__post_init__()

    def items(self) -> Iterator[tuple[str, Any]]:
        """``(name, value)`` of every field that is set, then the extra keys."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and value is not None:
                yield f.name, value
        yield from self.extra.items()

    def __getitem__(self, key: str):
        if key in self.extra:
            return self.extra[key]
        if key == "extra" or key not in _field_names(type(self)):
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        try:
            value = self[key]
        except KeyError:
            return default
        return default if value is None else value

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.items())

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "PlanSummary":
        if data is not None and not isinstance(data, dict):
            raise ValueError("a plan's summary must be a mapping")
        summary = cls()
        summary.update(**(data or {}))
        return summary


def _field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


@dataclass
class Plan:
    """A compression plan; ``layers`` lists every layer considered (dense ones included)."""

    layers: list[LayerPlan] = field(default_factory=list)
    criterion: str = ""
    target: dict[str, Any] = field(default_factory=dict)      # e.g. {"speedup": 3.0} or {"macs": 0.4}
    model: str | None = None
    input_shape: list[int] | None = None
    memory_format: str = "contiguous"                          # the format the plan was measured in
    environment: dict[str, Any] = field(default_factory=dict)  # device, threads, dtype, ... (latency plans)
    summary: PlanSummary = field(default_factory=PlanSummary)  # requested / achieved figures, messages
    options: dict[str, Any] = field(default_factory=dict)      # layer options passed to every method call
    model_layers: dict[str, list[int]] = field(default_factory=dict)   # the planned model's layers (empty: unknown)
    weights: str | None = None      # where the planned model's weights came from (e.g. shipped:NAME@sha256=...)

    def __post_init__(self):
        if not isinstance(self.summary, PlanSummary):
            self.summary = PlanSummary.from_dict(self.summary)
        layers = self.model_layers or {}
        if not isinstance(layers, dict) or not all(isinstance(v, (list, tuple)) for v in layers.values()):
            raise ValueError("a plan's model_layers must map layer names to weight shapes")
        self.model_layers = {str(k): [int(d) for d in v] for k, v in layers.items()}

    # ------------------------------------------------------------------ views
    @property
    def compressed(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.compressed]

    def rules(self, data_aware: bool = False) -> list[dict]:
        """NNI-style rules for :func:`convfactor.compress`: one per compressed layer, by exact name (with
        ``data_aware: true`` when ``data_aware``: fitted to calibration inputs, sequentially)."""
        rules = []
        for layer in self.compressed:
            rule = {"op_names": [glob.escape(layer.name)], "method": layer.method,
                    "rank": layer.ranks[0] if len(layer.ranks) == 1 else tuple(layer.ranks)}
            rule.update(self.options.get(layer.method, {}) if isinstance(self.options.get(layer.method), dict) else {})
            rule.update(layer.options or {})
            if data_aware:
                rule["data_aware"] = True
            rules.append(rule)
        return rules

    def apply(self, model: nn.Module, example_input=None, *, calibration=None, allow_unreachable: bool = False):
        """Factorize a copy of ``model`` as planned -> ``(compressed, CompressionReport)``.

        ``model`` is not modified.  Its Conv/Linear layers must be those the plan was made for
        (:attr:`model_layers`, when recorded), and every planned layer must exist and be a
        Conv/Linear; a mismatch, a bad name or rank fails before anything is factorized.  A plan that
        measured below its speed-up request (:meth:`shortfall`) is refused unless ``allow_unreachable``:
        its deepest cuts buy a speed-up nobody asked for at a large error.  The compressed model is
        left in the contiguous format; run it in :attr:`memory_format` (e.g. with
        :func:`convfactor.measure.latency.to_memory_format`) to get the planned speed.  With
        ``calibration`` (batches of model inputs) every layer is fitted to its responses on them, in
        execution order (the sequential data-aware fit of :func:`convfactor.compress`); without it,
        to its weights.
        """
        self.check_model(model)
        short = self.shortfall()
        if short and not allow_unreachable:
            raise ValueError(f"{short}; plan for a smaller speed-up, or apply it anyway with "
                             "allow_unreachable=True (CLI: --accept-unreachable)")
        layers = candidate_layers(model)
        missing = [p.name for p in self.compressed if p.name not in layers]
        if missing:
            raise ValueError(f"the plan names layers this model does not have: {', '.join(missing[:5])}"
                             f" (its layers are e.g. {', '.join(list(layers)[:5])})")
        if not self.compressed:         # the planner kept every layer dense (e.g. nothing measured faster)
            shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else None
            return copy.deepcopy(model), CompressionReport(input_shape=shape,
                                                           notes=["the plan keeps every layer dense"])
        return compress(model, self.rules(data_aware=calibration is not None), example_input, calibration=calibration)

    def shortfall(self) -> str | None:
        """Why this plan does not deliver its speed-up request: it measured below the accepted band (the
        request left to low rank, after a lower precision's credit); None when it reached it, overshot
        it, or had no speed-up request."""
        s = self.summary
        if not s.speedup_band or s.measured_speedup is None or s.measured_speedup >= s.speedup_band[0]:
            return None
        asked = (s.precision_credit or {}).get("low_rank_request") or s.requested_speedup
        return (f"this plan measured {s.measured_speedup:.2f}x against a {asked:.3g}x request (band "
                f"{s.speedup_band[0]:.3g}-{s.speedup_band[1]:.3g}x): {s.message or 'the target is unreachable here'}")

    def check_weights(self, source: str | None) -> None:
        """Raise a one-line ValueError if the plan records its model's weights and ``source`` names others:
        ranks chosen on trained weights say nothing about random ones (nor the other way round)."""
        if self.weights and source and source != self.weights:
            raise ValueError(f"this plan was made for weights {_short(self.weights)}, not {_short(source)}; load the "
                             "same weights (a built-in model loads its shipped ones unless --random-init) or re-plan")

    def check_model(self, model: nn.Module) -> None:
        """Raise a one-line ValueError if ``model``'s Conv/Linear layers differ from the planned model's."""
        if not self.model_layers:
            return
        mismatch = signature_mismatch(self.model_layers, layer_signature(model))
        if mismatch:
            made_for = f" ({self.model})" if self.model else ""
            raise ValueError(f"this plan was made for another model{made_for}: {mismatch}; make a plan for this model")

    def table(self) -> str:
        head = (f"{'layer':<28} {'method':<12} {'ranks':<10} {'criterion':<10} {'MACs':>8} {'err':>7} "
                f"{'kappa':>9} {'dense ms':>9} {'new ms':>8}")
        lines = [head, "-" * len(head)]
        for L in self.layers:
            ratio = (f"{L.macs_after / L.macs_before:.3f}" if L.macs_before and L.macs_after is not None else "-")
            lines.append(
                f"{L.name[:28]:<28} {(L.method_key or 'dense'):<12} {','.join(map(str, L.ranks or [])) or '-':<10} "
                f"{L.criterion[:10]:<10} {ratio:>8} {_f(L.error, '.4f'):>7} {_f(L.kappa, '.3g'):>9} "
                f"{_f(L.dense_ms, '.3f'):>9} {_f(L.factorized_ms, '.3f'):>8}" + (f"  {L.note}" if L.note else ""))
        lines.append("-" * len(head))
        for key, value in self.summary.items():
            if key != "history":
                lines.append(f"{key}: {_show(value)}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = self.summary.to_dict()
        data["version"] = PLAN_VERSION
        return plain_data(data, nan=None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise ValueError("a plan file must be a mapping with a 'layers' list")
        data = dict(data)
        version = data.pop("version", PLAN_VERSION)
        if not isinstance(version, int):
            raise ValueError(f"a plan's version must be an integer, got {version!r}")
        if version > PLAN_VERSION:
            raise ValueError(f"plan version {version} is newer than this convfactor understands ({PLAN_VERSION})")
        known = {f.name for f in fields(LayerPlan)}
        layers = []
        for i, raw in enumerate(data.pop("layers")):
            if not isinstance(raw, dict) or "name" not in raw:
                raise ValueError(f"plan layer {i}: expected a mapping with a 'name'")
            unknown = set(raw) - known
            if unknown:
                raise ValueError(f"plan layer {raw['name']!r}: unknown keys {sorted(unknown)}")
            try:
                layers.append(LayerPlan(**raw))
            except TypeError as exc:                  # e.g. ``ranks: 5`` instead of ``ranks: [5]``
                raise ValueError(f"plan layer {raw['name']!r}: {exc}") from None
        top = {f.name for f in fields(cls)}
        unknown = set(data) - top
        if unknown:
            raise ValueError(f"plan: unknown keys {sorted(unknown)}")
        return cls(layers=layers, **data)

    def save(self, path, *, overwrite: bool = True) -> Path:
        """Write YAML (``.yaml``/``.yml``) or JSON atomically (nothing is left behind on failure);
        an existing file is replaced only with ``overwrite``, a directory never."""
        path = Path(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"directory {path.parent} does not exist")
        check_output(path, overwrite=overwrite)
        data = self.to_dict()
        if path.suffix.lower() in (".yaml", ".yml"):
            text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
        else:
            text = json.dumps(data, indent=2)
        atomic_write(path, text)
        return path

    @classmethod
    def load(cls, path) -> "Plan":
        """Read a plan file (YAML, or JSON for ``.json``); a malformed one is one ValueError line."""
        data = read_structured(path, "plan file")
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"plan file {path}: {exc}") from None


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _show(value) -> str:
    """A summary value for the table: floats to 4 significant digits, tuples of them too."""
    if isinstance(value, float):
        return format(value, ".4g")
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return str(value)


def _short(source: str) -> str:
    """A weights source with its sha256 cut to 12 hex digits, for messages."""
    head, sep, digest = source.partition("@sha256=")
    return head + (f"@sha256={digest[:12]}..." if sep else "")

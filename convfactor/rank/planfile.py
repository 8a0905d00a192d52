"""The :class:`Plan`: per layer the method, ranks, the criterion that chose them and measured numbers.

A plan is plain data.  It is saved as YAML (``.yaml``/``.yml``) or JSON (anything else), can be
edited by hand (change a rank, set ``method: null`` to keep a layer dense) and re-applied with
:meth:`Plan.apply` or ``convfactor compress MODEL --plan plan.yaml``.
"""
from __future__ import annotations

import glob
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import yaml
from torch import nn

from ..compression.api import compress
from ..compression.surgery import candidate_layers
from ..utils import plain_data

__all__ = ["LayerPlan", "Plan", "PlanSummary", "PLAN_VERSION"]

PLAN_VERSION = 1


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

    def __post_init__(self):
        if self.ranks is not None:
            self.ranks = [int(r) for r in self.ranks]
        if self.method is not None and not self.ranks:
            raise ValueError(f"plan layer {self.name!r}: method {self.method!r} needs ranks")

    @property
    def compressed(self) -> bool:
        return self.method is not None


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
    # settings that shaped the ranks
    energy: float | None = None
    weakening: float | None = None
    kappa_threshold: float | None = None
    round_to: int | None = None
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

    def __post_init__(self):
        if not isinstance(self.summary, PlanSummary):
            self.summary = PlanSummary.from_dict(self.summary)

    # ------------------------------------------------------------------ views
    @property
    def compressed(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.compressed]

    def rules(self) -> list[dict]:
        """NNI-style rules for :func:`convfactor.compress`: one per compressed layer, by exact name."""
        rules = []
        for layer in self.compressed:
            rule = {"op_names": [glob.escape(layer.name)], "method": layer.method,
                    "rank": layer.ranks[0] if len(layer.ranks) == 1 else tuple(layer.ranks)}
            rule.update(self.options.get(layer.method, {}) if isinstance(self.options.get(layer.method), dict) else {})
            rules.append(rule)
        return rules

    def apply(self, model: nn.Module, example_input=None, *, calibration=None):
        """Factorize a copy of ``model`` as planned -> ``(compressed, CompressionReport)``.

        ``model`` is not modified.  Every planned layer must exist and be a Conv/Linear; a bad
        name or rank fails before anything is factorized.  The compressed model is left in the
        contiguous format; run it in :attr:`memory_format` (e.g. with
        :func:`convfactor.measure.latency.to_memory_format`) to get the planned speed.
        """
        layers = candidate_layers(model)
        missing = [p.name for p in self.compressed if p.name not in layers]
        if missing:
            raise ValueError(f"the plan names layers this model does not have: {', '.join(missing[:5])}"
                             f" (its layers are e.g. {', '.join(list(layers)[:5])})")
        return compress(model, self.rules(), example_input, calibration=calibration)

    def table(self) -> str:
        head = (f"{'layer':<28} {'method':<12} {'ranks':<10} {'criterion':<10} {'MACs':>8} {'err':>7} "
                f"{'kappa':>9} {'dense ms':>9} {'new ms':>8}")
        lines = [head, "-" * len(head)]
        for L in self.layers:
            ratio = (f"{L.macs_after / L.macs_before:.3f}" if L.macs_before and L.macs_after is not None else "-")
            lines.append(
                f"{L.name[:28]:<28} {(L.method or 'dense'):<12} {','.join(map(str, L.ranks or [])) or '-':<10} "
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
            layers.append(LayerPlan(**raw))
        top = {f.name for f in fields(cls)}
        unknown = set(data) - top
        if unknown:
            raise ValueError(f"plan: unknown keys {sorted(unknown)}")
        return cls(layers=layers, **data)

    def save(self, path) -> Path:
        """Write YAML (``.yaml``/``.yml``) or JSON; the file is replaced atomically."""
        path = Path(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"directory {path.parent} does not exist")
        data = self.to_dict()
        if path.suffix.lower() in (".yaml", ".yml"):
            text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
        else:
            text = json.dumps(data, indent=2)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> "Plan":
        path = Path(path)
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return cls.from_dict(data)


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _show(value) -> str:
    """A summary value for the table: floats to 4 significant digits, tuples of them too."""
    if isinstance(value, float):
        return format(value, ".4g")
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return str(value)

"""The :class:`Plan`: per layer the method, ranks, the criterion that chose them and measured numbers.

A plan is plain data.  It is saved as YAML (``.yaml``/``.yml``) or JSON (anything else), can be
edited by hand (change a rank, set ``method: null`` to keep a layer dense) and re-applied with
:meth:`Plan.apply` or ``convfactor compress MODEL --plan plan.yaml``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["LayerPlan", "Plan", "PLAN_VERSION"]

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
class Plan:
    """A compression plan; ``layers`` lists every layer considered (dense ones included)."""

    layers: list[LayerPlan] = field(default_factory=list)
    criterion: str = ""
    target: dict[str, Any] = field(default_factory=dict)      # e.g. {"speedup": 3.0} or {"macs": 0.4}
    model: str | None = None
    input_shape: list[int] | None = None
    memory_format: str = "contiguous"                          # the format the plan was measured in
    environment: dict[str, Any] = field(default_factory=dict)  # device, threads, dtype, ... (latency plans)
    summary: dict[str, Any] = field(default_factory=dict)      # requested / achieved figures, messages
    options: dict[str, Any] = field(default_factory=dict)      # layer options passed to every method call

    # ------------------------------------------------------------------ views
    @property
    def compressed(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.compressed]

    def rules(self) -> list[dict]:
        """NNI-style rules for :func:`convfactor.compress`: one per compressed layer, by exact name."""
        import glob
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
        from ..compression.api import compress
        from ..compression.surgery import candidate_layers
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
            if key != "history" and value is not None:
                lines.append(f"{key}: {_f(value, '.4g') if isinstance(value, float) else value}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = PLAN_VERSION
        return _plain(data)

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
            import yaml
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
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return cls.from_dict(data)


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _plain(value):
    """Tuples -> lists, tensors/numpy scalars -> Python numbers, so YAML safe_dump accepts it."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return value

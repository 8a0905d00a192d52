"""Model surgery: find layers, apply NNI-style rules, swap modules.

A *rule* is a dict in NNI's config-list style::

    {"op_types": ["Conv2d"], "op_names": ["body.*"], "exclude_op_names": ["head.*"],
     "method": "channel_svd", "macs_ratio": 0.5, ...method options...}
    {"op_names": ["tail.*"], "exclude": True}          # remove these from compression

Selection: ``op_types`` are class names (``"Conv2d"``, ``"Linear"``, ``"default"`` = every
Conv1d/2d/3d and Linear); ``op_names`` are glob patterns on qualified module names.  A rule with
neither selects every supported layer.  Rules apply in order; a later rule overrides an earlier one
for the layers it selects, and ``exclude: True`` removes them.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import nn

from ..spec.convspec import is_conv

__all__ = ["Rule", "parse_rules", "candidate_layers", "select", "get_submodule", "set_submodule", "TARGET_KEYS"]

TARGET_KEYS = ("rank", "macs_ratio", "energy")
_SELECT_KEYS = {"op_types", "op_names", "exclude_op_names", "exclude"}


@dataclass
class Rule:
    op_types: list[str] | None = None
    op_names: list[str] | None = None
    exclude_op_names: list[str] = field(default_factory=list)
    exclude: bool = False
    method: str | None = None
    target: dict[str, Any] = field(default_factory=dict)     # exactly one of TARGET_KEYS
    options: dict[str, Any] = field(default_factory=dict)    # method-specific (e.g. splits, share)
    index: int = 0

    def matches(self, name: str, layer: nn.Module) -> bool:
        if self.op_types is not None:
            types = set(self.op_types)
            ok = type(layer).__name__ in types or ("default" in types and _is_candidate(layer))
            if not ok:
                return False
        if self.op_names is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.op_names):
            return False
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude_op_names):
            return False
        return True


def _as_list(value, key: str, index: int) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"rule {index}: {key} must be a string or a list of strings, got {value!r}")


def parse_rules(rules: Iterable[dict]) -> list[Rule]:
    """Validate rules (unknown keys are method options; checked by the method later)."""
    from ..methods import registry

    if isinstance(rules, dict):
        rules = [rules]
    parsed = []
    for i, raw in enumerate(rules):
        if not isinstance(raw, dict):
            raise ValueError(f"rule {i}: expected a dict, got {type(raw).__name__}")
        raw = dict(raw)
        rule = Rule(op_types=_as_list(raw.pop("op_types", None), "op_types", i),
                    op_names=_as_list(raw.pop("op_names", None), "op_names", i),
                    exclude_op_names=_as_list(raw.pop("exclude_op_names", None), "exclude_op_names", i) or [],
                    exclude=bool(raw.pop("exclude", False)), index=i)
        rule.method = raw.pop("method", None)
        rule.target = {k: raw.pop(k) for k in TARGET_KEYS if raw.get(k) is not None}
        for k in TARGET_KEYS:
            raw.pop(k, None)
        rule.options = raw
        if not rule.exclude:
            if rule.method is None:
                raise ValueError(f"rule {i}: no 'method' (known: {', '.join(sorted(registry._METHODS))})")
            try:
                registry.get(rule.method)
            except KeyError as exc:
                raise ValueError(f"rule {i}: {exc.args[0]}") from None
            if len(rule.target) != 1:
                raise ValueError(f"rule {i}: give exactly one of {', '.join(TARGET_KEYS)}")
            _check_target(rule.target, i)
        parsed.append(rule)
    return parsed


def _check_target(target: dict, index: int) -> None:
    (key, value), = target.items()
    if key == "rank":
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"rule {index}: rank must be a positive int or a tuple of them, got {value!r}")
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
            raise ValueError(f"rule {index}: {key} must be in (0, 1], got {value!r}")


def _is_candidate(layer: nn.Module) -> bool:
    return is_conv(layer) or isinstance(layer, nn.Linear)


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv1d/2d/3d and Linear by qualified name (already-factorized layers excluded)."""
    from ..methods.base import Factorized

    out = {}
    factorized_prefixes = [n + "." for n, m in model.named_modules() if isinstance(m, Factorized)]
    for name, layer in model.named_modules():
        if _is_candidate(layer) and not any(name.startswith(p) for p in factorized_prefixes):
            out[name] = layer
    return out


def select(model: nn.Module, rules: list[Rule]) -> dict[str, Rule]:
    """Layer name -> the rule that applies (the last one selecting it), excluded layers dropped.

    Raises if a rule selects no layer at all: a typo in ``op_names`` must not pass silently.
    """
    layers = candidate_layers(model)
    chosen: dict[str, Rule] = {}
    for rule in rules:
        hits = [n for n, layer in layers.items() if rule.matches(n, layer)]
        if not hits:
            raise ValueError(f"rule {rule.index} selects no layer (op_types={rule.op_types}, "
                             f"op_names={rule.op_names}); layers are e.g. {', '.join(list(layers)[:5])}")
        for name in hits:
            if rule.exclude:
                chosen.pop(name, None)
            else:
                chosen[name] = rule
    return chosen


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (``"a.b.0"``) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(model, parent_name)
    setattr(parent, child, module)

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

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable

from torch import nn

from ..methods import registry
from ..methods.base import Factorized, LayerTarget, Method
from ..methods.data_aware import DataAwareSettings
from ..spec.convspec import is_conv

__all__ = ["Rule", "Selector", "LayerTarget", "parse_rules", "parse_rule", "configure", "candidate_layers", "select",
           "get_submodule", "set_submodule", "TARGET_KEYS"]

TARGET_KEYS = ("rank", "macs_ratio", "energy")
DATA_AWARE_KEYS = tuple(f.name for f in dataclasses.fields(DataAwareSettings))


@dataclass(frozen=True)
class Selector:
    """Which layers a rule picks: class names (``"default"`` = every Conv/Linear) and glob patterns."""

    op_types: tuple[str, ...] | None = None
    op_names: tuple[str, ...] | None = None
    exclude_op_names: tuple[str, ...] = ()

    def matches(self, name: str, layer: nn.Module) -> bool:
        if self.op_types is not None:
            types = set(self.op_types)
            if not (type(layer).__name__ in types or ("default" in types and _is_candidate(layer))):
                return False
        if self.op_names is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.op_names):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude_op_names)


@dataclass(frozen=True)
class Rule:
    """A parsed rule: a selector, and either ``exclude`` or a target with a configured method.

    ``data_aware`` holds the response-fitting settings of a rule with ``data_aware: true`` (None
    otherwise); ``index`` is the rule's position, for messages.
    """

    selector: Selector
    exclude: bool = False
    target: LayerTarget | None = None
    method: Method | None = None
    data_aware: DataAwareSettings | None = None
    index: int = 0

    def matches(self, name: str, layer: nn.Module) -> bool:
        return self.selector.matches(name, layer)


def _as_tuple(value, key: str, index: int) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"rule {index}: {key} must be a string or a list of strings, got {value!r}")


def configure(method: str | Method, options: dict[str, Any], *,
              data_aware: bool) -> tuple[Method, DataAwareSettings | None]:
    """The configured method and the data-aware settings given by ``options``, a mix of the method's
    fields and :class:`DataAwareSettings` keys (a key that is both goes to both).

    Data-aware keys need ``data_aware`` (calibration inputs); any other key is an error.
    """
    base = registry.get(method)             # a Method instance comes back as is
    own = set(base.option_names())
    unknown = sorted(set(options) - own - set(DATA_AWARE_KEYS))
    if unknown:
        raise ValueError(f"{base.name}: unknown option(s) {unknown}; known: {', '.join(sorted(own)) or 'none'}"
                         f" (and with calibration: {', '.join(DATA_AWARE_KEYS)})")
    stray = sorted(set(options) - own)
    if stray and not data_aware:
        raise ValueError(f"{', '.join(stray)}: data-aware fitting settings, which need calibration "
                         f"(calibration= / rule key data_aware: true)")
    configured = registry.get(base, **{k: v for k, v in options.items() if k in own})
    settings = DataAwareSettings(**{k: v for k, v in options.items() if k in DATA_AWARE_KEYS}) if data_aware else None
    return configured, settings


def parse_rule(raw: dict, index: int = 0) -> Rule:
    """One NNI-style rule dict -> :class:`Rule`; the other keys are the method's options (and, with
    ``data_aware: true``, data-aware settings).  Errors name the rule."""
    if not isinstance(raw, dict):
        raise ValueError(f"rule {index}: expected a dict, got {type(raw).__name__}")
    raw = dict(raw)
    selector = Selector(op_types=_as_tuple(raw.pop("op_types", None), "op_types", index),
                        op_names=_as_tuple(raw.pop("op_names", None), "op_names", index),
                        exclude_op_names=_as_tuple(raw.pop("exclude_op_names", None), "exclude_op_names", index) or ())
    if bool(raw.pop("exclude", False)):
        return Rule(selector, exclude=True, index=index)
    name = raw.pop("method", None)
    if name is None:
        raise ValueError(f"rule {index}: no 'method' (known: {', '.join(sorted(registry.available()))})")
    targets = {k: raw.pop(k) for k in TARGET_KEYS if k in raw}
    data_aware = bool(raw.pop("data_aware", False))
    try:
        default = registry.get(name)           # the one registry look-up of this rule's method
    except KeyError as exc:
        raise ValueError(f"rule {index}: {exc.args[0]}") from None
    try:
        target = LayerTarget(**{k: v for k, v in targets.items() if v is not None})
        method, settings = configure(default, raw, data_aware=data_aware)
    except ValueError as exc:
        raise ValueError(f"rule {index}: {exc}") from None
    return Rule(selector, target=target, method=method, data_aware=settings, index=index)


def parse_rules(rules: Iterable[dict] | dict) -> list[Rule]:
    """Validate rules: selectors, targets and method options are checked, and each method is looked up
    and configured once, here."""
    if isinstance(rules, dict):
        rules = [rules]
    return [parse_rule(raw, i) for i, raw in enumerate(rules)]


def _is_candidate(layer: nn.Module) -> bool:
    return is_conv(layer) or isinstance(layer, nn.Linear)


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv1d/2d/3d and Linear by qualified name (already-factorized layers excluded)."""
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
            sel = rule.selector
            raise ValueError(f"rule {rule.index} selects no layer (op_types={_listed(sel.op_types)}, "
                             f"op_names={_listed(sel.op_names)}); layers are e.g. {', '.join(list(layers)[:5])}")
        for name in hits:
            if rule.exclude:
                chosen.pop(name, None)
            else:
                chosen[name] = rule
    return chosen


def _listed(values: tuple[str, ...] | None) -> list[str] | None:
    return None if values is None else list(values)


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (``"a.b.0"``) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(model, parent_name)
    setattr(parent, child, module)

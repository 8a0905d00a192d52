"""Model surgery: find layers, apply NNI-style rules, swap modules.

A *rule* is a dict in NNI's config-list style::

    {"op_types": ["Conv2d"], "op_names": ["body.*"], "exclude_op_names": ["head.*"],
     "method": "channel_svd", "macs_ratio": 0.5, ...method options...}
    {"method": "sliced_svd:slices=4", "energy": 0.9}   # a configured method, as --method names it
    {"op_names": ["tail.*"], "exclude": True}          # remove these from compression

Selection: ``op_types`` are class names, matched against every class of the layer's MRO, so
``"Conv3d"`` also selects torchvision's ``Conv3DSimple`` (``"default"`` = every Conv1d/2d/3d and
Linear); ``op_names`` are glob patterns on qualified module names.  A rule with neither selects
every supported layer.  Rules apply in order; a later rule overrides an earlier one for the layers
it selects, and ``exclude: true`` (a bool, nothing else) removes them.

Every key of a rule is checked: an unknown key is an error naming the nearest valid key.

*Explicit* requests (:func:`is_explicit`): a rule is explicit for a layer when its target is a
``rank``, or when one of its ``op_names`` is that layer's exact name (no wildcard; a name with glob
characters may be given ``glob.escape``'d, as :meth:`convfactor.rank.Plan.rules` writes it).
Anything else -- ``op_types``, wildcard patterns, no selector -- with ``macs_ratio`` or ``energy`` is
a *whole-model target*: a layer that cannot reach it is skipped with the reason, while an explicit
request that cannot be met fails loudly.

Layers that are never candidates (:func:`layer_problems`, each with its reason): zero-sized layers,
Conv/Linear subclasses whose ``forward`` is not the base class's (e.g. timm's ``StdConv2d``, which
standardizes its weight in ``forward``; timm's ``Conv2dSame`` is supported, see
:class:`~convfactor.spec.convspec.SamePad`), children of ``nn.MultiheadAttention`` (it reads
``out_proj.weight`` itself) and a module registered at several places.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import glob
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..methods import registry
from ..methods.base import Factorized, LayerTarget, Method
from ..methods.data_aware import DataAwareSettings
from ..spec.convspec import is_conv, is_dynamic_same

__all__ = ["Placeholder", "Rule", "Selector", "LayerTarget", "parse_rules", "parse_rule", "configure", "candidate_layers", "select",
           "get_submodule", "set_submodule", "TARGET_KEYS", "RULE_KEYS", "rules_of", "layer_problems",
           "conv_and_linear_layers", "is_explicit", "own_problem"]

TARGET_KEYS = ("rank", "macs_ratio", "energy")
DATA_AWARE_KEYS = tuple(f.name for f in dataclasses.fields(DataAwareSettings))
SELECTOR_KEYS = ("op_types", "op_names", "exclude_op_names")
#: the keys every rule may have; the others are its method's options (and data-aware settings)
RULE_KEYS = SELECTOR_KEYS + ("exclude", "method") + TARGET_KEYS + ("data_aware",)



class Placeholder(nn.Identity):
    """An identity standing where a layer was, naming the layer ``into`` that absorbed it (a folded
    BatchNorm, a merged conv); ``shown`` is how ``extra_repr`` words it."""

    shown = "into={!r}"

    def __init__(self, into: str = ""):
        super().__init__()
        self.into = into

    def extra_repr(self) -> str:
        return self.shown.format(self.into)

@dataclass(frozen=True)
class Selector:
    """Which layers a rule picks: class names (``"default"`` = every Conv/Linear) and glob patterns."""

    op_types: tuple[str, ...] | None = None
    op_names: tuple[str, ...] | None = None
    exclude_op_names: tuple[str, ...] = ()

    def matches(self, name: str, layer: nn.Module) -> bool:
        if self.op_types is not None:
            types = set(self.op_types)
            classes = {c.__name__ for c in type(layer).__mro__}       # subclasses match their bases' names
            if not (classes & types or ("default" in types and _is_candidate(layer))):
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
    if _flag(raw.pop("exclude", False), "exclude", index):
        _check_keys(raw, index, None)
        return Rule(selector, exclude=True, index=index)
    name = raw.pop("method", None)
    if name is None:
        raise ValueError(f"rule {index}: no 'method' (known: {', '.join(sorted(registry.available()))})")
    targets = {k: raw.pop(k) for k in TARGET_KEYS if k in raw}
    data_aware = _flag(raw.pop("data_aware", False), "data_aware", index)
    try:
        default = registry.get(name)           # the one look-up of this rule's method ("name:key=value" too)
    except KeyError as exc:
        raise ValueError(f"rule {index}: {exc.args[0]}") from None
    except ValueError as exc:                   # a bad option in "name:key=value", in the method's words
        raise ValueError(f"rule {index}: {exc}") from None
    _check_keys(raw, index, default)
    try:
        target = LayerTarget(**{k: v for k, v in targets.items() if v is not None})
        method, settings = configure(default, raw, data_aware=data_aware)
    except ValueError as exc:
        raise ValueError(f"rule {index}: {exc}") from None
    if target.energy is not None and not method.supports_energy:
        raise ValueError(f"rule {index}: {method.name}: an energy target is not defined; give rank or macs_ratio")
    return Rule(selector, target=target, method=method, data_aware=settings, index=index)


def _flag(value, key: str, index: int) -> bool:
    """A rule's on/off key: a bool and nothing else (``"yes"`` or ``["0"]`` are truthy but no answer)."""
    if not isinstance(value, bool):
        raise ValueError(f"rule {index}: {key} must be true or false, got {value!r}")
    return value


def _check_keys(raw: dict, index: int, method: Method | None) -> None:
    """``raw`` (a rule less its rule keys) holds only options of ``method`` and data-aware settings.

    A key that is an option of another method is left to :func:`configure` ("unknown option");
    any other key is an unknown key, named with the nearest valid one."""
    own = set(method.option_names()) if method is not None else set()
    for key in raw:
        if key in RULE_KEYS or key in own or key in DATA_AWARE_KEYS or _is_any_option(key):
            continue
        valid = list(RULE_KEYS) + sorted(own) + list(DATA_AWARE_KEYS)
        near = difflib.get_close_matches(str(key), valid, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        owner = f"; {method.name}'s options: {', '.join(sorted(own)) or 'none'}" if method is not None else ""
        raise ValueError(f"rule {index}: unknown key {key!r}{hint}; rule keys: {', '.join(RULE_KEYS)}{owner}")


def _is_any_option(key: str) -> bool:
    """Whether ``key`` is an option of some registered method."""
    return any(key in registry.get(name).option_names() for name in registry.available())


def rules_of(rules) -> list:
    """The rule dicts in ``rules``: a dict, a list/tuple (or other iterable) of dicts, or a *plan*.

    A plan is any object with a ``to_rules()`` method or a ``rules`` attribute (a method returning
    the list, or the list itself), as :class:`convfactor.rank.Plan` has: duck typing, because this
    layer sits below :mod:`convfactor.rank`."""
    if isinstance(rules, dict):
        return [rules]
    for attr in ("to_rules", "rules"):
        source = getattr(rules, attr, None)
        if source is not None and not isinstance(rules, (list, tuple)):
            return rules_of(source() if callable(source) else source)
    if rules is None or isinstance(rules, (str, bytes)) or not hasattr(rules, "__iter__"):
        raise ValueError(f"rules must be a dict, a list of dicts or a plan (an object with .rules()), "
                         f"got {type(rules).__name__}")
    return list(rules)


def parse_rules(rules) -> list[Rule]:
    """Validate rules (see :func:`rules_of` for what ``rules`` may be): selectors, keys, targets and
    method options are checked, and each method is looked up and configured once, here."""
    return [parse_rule(raw, i) for i, raw in enumerate(rules_of(rules))]


def _is_candidate(layer: nn.Module) -> bool:
    return is_conv(layer) or isinstance(layer, nn.Linear)


def conv_and_linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv1d/2d/3d and Linear (subclasses included) by qualified name, except those inside an
    already-factorized layer."""
    out = {}
    factorized_prefixes = [n + "." for n, m in model.named_modules() if isinstance(m, Factorized)]
    for name, layer in model.named_modules():
        if _is_candidate(layer) and not any(name.startswith(p) for p in factorized_prefixes):
            out[name] = layer
    return out


def layer_problems(model: nn.Module, layers: dict[str, nn.Module] | None = None) -> dict[str, str]:
    """``{name: reason}`` for each Conv/Linear layer that is never factorized (see the module docstring)."""
    layers = conv_and_linear_layers(model) if layers is None else layers
    modules = dict(model.named_modules())
    places: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        places.setdefault(id(module), []).append(name)
    problems = {}
    for name, layer in layers.items():
        parent = modules.get(name.rpartition(".")[0]) if name else None
        reason = (own_problem(layer) or _parent_problem(parent, name)
                  or (f"the same module is used at several places ({', '.join(places[id(layer)][:3])})"
                      if len(places.get(id(layer), ())) > 1 else None))
        if reason:
            problems[name] = reason
    return problems


#: the torch classes whose own ``forward`` a candidate layer must keep
_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def own_problem(layer: nn.Module) -> str | None:
    """Why ``layer`` (a Conv/Linear) itself can never be factorized exactly, or None: its weight is
    not initialized or is empty, or its class overrides ``forward`` / ``_conv_forward`` (other than
    timm's ``Conv2dSame``, whose dynamic padding the replacement carries)."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
        return "its weight is not initialized"
    if weight.numel() == 0:
        return f"zero-sized (weight shape {tuple(weight.shape)}): nothing to factorize"
    base = next((b for b in _BASES if isinstance(layer, b)), type(layer))
    cls = type(layer)
    for hook in ("forward", "_conv_forward"):
        if getattr(cls, hook, None) is not getattr(base, hook, None) and not is_dynamic_same(layer):
            return (f"{cls.__name__} overrides {base.__name__}.{hook} (it does not compute a plain "
                    f"{base.__name__} of its .weight, e.g. weight standardization); supported subclasses: "
                    "timm's Conv2dSame")
    return None


def _parent_problem(parent: nn.Module | None, name: str) -> str | None:
    if isinstance(parent, nn.MultiheadAttention):
        child = name.rpartition(".")[2]
        return (f"its parent MultiheadAttention reads {child}.weight directly "
                "(F.multi_head_attention_forward), so it cannot be replaced")
    return None


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv1d/2d/3d and Linear by qualified name that can be factorized: already-factorized
    layers and the layers of :func:`layer_problems` are left out."""
    layers = conv_and_linear_layers(model)
    problems = layer_problems(model, layers)
    return {name: layer for name, layer in layers.items() if name not in problems}


def is_explicit(rule: Rule, name: str) -> bool:
    """Whether ``rule`` asks for layer ``name`` explicitly: a ``rank`` target, or ``op_names`` naming
    the layer exactly (see the module docstring).  Only such requests fail loudly when unreachable."""
    if rule.target is not None and rule.target.rank is not None:
        return True
    return any(p == name or p == glob.escape(name) for p in rule.selector.op_names or ())


def select(model: nn.Module, rules: list[Rule]) -> dict[str, Rule]:
    """Layer name -> the rule that applies (the last one selecting it), excluded layers dropped.

    Every Conv/Linear layer can be selected, those of :func:`layer_problems` too (compress reports
    them as skipped, with the reason).  Raises if a rule selects no layer at all (a typo in
    ``op_names`` must not pass silently), or if no layer is left once the exclusions are applied.
    """
    layers = conv_and_linear_layers(model)
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
    if not chosen:
        raise ValueError("no layer was selected: " + ("no rules were given" if not rules else
                         "the exclude rules remove every layer the other rules select"))
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

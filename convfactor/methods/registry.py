"""Method name -> configured :class:`~convfactor.methods.base.Method`.

``get("cp")`` is the default configuration; ``get("cp", form="folded", n_iter=25)`` a configured
one (a frozen dataclass whose fields are the options).  Methods are imported lazily, so
``import convfactor`` stays cheap and has no side effects.  A new method is one new module plus
one line here (or :func:`register` for a user-defined one).
"""
from __future__ import annotations

import dataclasses
import importlib

from ..utils import UnknownName, parse_configured
from .base import Method

__all__ = ["get", "register", "available", "parse"]

#: name -> "module:ClassName" (relative to convfactor.methods)
_METHODS: dict[str, str] = {
    "channel_svd": "channel_svd:ChannelSVD",
    "sliced_svd": "sliced_svd:SlicedSVD",
    "linear_svd": "channel_svd:LinearSVD",
    "spatial_svd": "spatial_svd:SpatialSVD",
    "tucker2": "tucker2:Tucker2",
    "cp": "cp:CP",
    "depthwise": "depthwise:Depthwise",
    "basis": "basis:Basis",
    "tt": "tt:TT",
    "lowrank_sparse": "lowrank_sparse:LowRankSparse",
}
#: name -> the default-configured method (built-in ones on first use; registered ones as given)
_DEFAULTS: dict[str, Method] = {}


def available() -> list[str]:
    """Names of every known method: the built-in ones, then those registered."""
    return list(_METHODS) + [name for name in _DEFAULTS if name not in _METHODS]


def _default(name: str) -> Method:
    if name in _DEFAULTS:
        return _DEFAULTS[name]
    if name not in _METHODS:
        raise UnknownName(f"unknown method {name!r}; known: {', '.join(sorted(available()))}")
    module_name, class_name = _METHODS[name].split(":")
    method = getattr(importlib.import_module(f"{__package__}.{module_name}"), class_name)()
    _DEFAULTS[name] = method
    return method


def _check_options(method: Method, options: dict) -> None:
    """A ValueError naming any key of ``options`` that is not one of ``method``'s fields."""
    unknown = sorted(set(options) - set(method.option_names()))
    if unknown:
        known = ", ".join(method.option_names()) or "none"
        raise ValueError(f"{method.name}: unknown option(s) {unknown}; known: {known}")


def get(name: str | Method, **options) -> Method:
    """The method called ``name``, configured with ``options`` (its dataclass fields).

    ``name`` may carry options itself, ``"name:key=value,key=value"`` (see :func:`parse`; ``options``
    given here win over those).  A :class:`Method` instance is returned as is, or with ``options``
    replaced.  An unknown name raises :class:`~convfactor.utils.UnknownName` (a ``KeyError``), an
    unknown option or a bad value a ValueError (the method's own message).
    """
    if isinstance(name, Method):
        method = name
    else:
        base, given = parse_configured(name, what="method")
        method = _default(base)
        options = {**given, **options}
    if not options:
        return method
    _check_options(method, options)
    return dataclasses.replace(method, **options)


def register(method: Method) -> Method:
    """Register a user-defined method (an instance: its default configuration) under ``method.name``."""
    if not method.name:
        raise ValueError("a method needs a name")
    _DEFAULTS[method.name] = method
    return method


def parse(text: str) -> Method:
    """A configured method from ``"name"`` or ``"name:key=value,key=value"`` (values read as YAML
    scalars: ``sliced_svd:slices=4``, ``cp:form=folded,n_iter=25``), as the CLI's ``--method`` takes it."""
    return get(text)

"""Method name -> :class:`~convfactor.methods.base.Method` instance.

Methods are imported lazily, so ``import convfactor`` stays cheap and has no side effects.
A new method is one new module plus one line here.
"""
from __future__ import annotations

import importlib

from .base import Method

#: name -> "module:ClassName" (relative to convfactor.methods)
_METHODS: dict[str, str] = {
    "channel_svd": "channel_svd:ChannelSVD",
    "linear_svd": "channel_svd:LinearSVD",
    "spatial_svd": "spatial_svd:SpatialSVD",
    "tucker2": "tucker2:Tucker2",
    "cp": "cp:CP",
    "depthwise": "depthwise:Depthwise",
    "basis": "basis:Basis",
    "tt": "tt:TT",
    "lowrank_sparse": "lowrank_sparse:LowRankSparse",
}
_CACHE: dict[str, Method] = {}


def available() -> list[str]:
    """Names of the methods whose module is present."""
    names = []
    for name in _METHODS:
        try:
            get(name)
        except (KeyError, ImportError):
            continue
        names.append(name)
    return names


def get(name: str | Method) -> Method:
    """The method called ``name`` (a :class:`Method` instance is returned as is)."""
    if isinstance(name, Method):
        return name
    if name in _CACHE:
        return _CACHE[name]
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_METHODS))}")
    module_name, class_name = _METHODS[name].split(":")
    try:
        module = importlib.import_module(f"{__package__}.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}.{module_name}":
            raise KeyError(f"method {name!r} is not available in this version") from exc
        raise
    method = getattr(module, class_name)()
    _CACHE[name] = method
    return method


def register(method: Method) -> Method:
    """Register a user-defined method instance under ``method.name``."""
    if not method.name:
        raise ValueError("a method needs a name")
    _METHODS.setdefault(method.name, "")
    _CACHE[method.name] = method
    return method

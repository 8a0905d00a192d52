"""Measurement: counts (params, MACs, FLOPs), latency, and quality metrics.

``count`` is loaded lazily, so that ``convfactor.measure.allocator`` can be imported (and the CLI can
re-execute itself under a faster allocator) before torch is."""
from __future__ import annotations

import importlib

__all__ = ["count"]


def __getattr__(name: str):
    if name == "count":
        value = importlib.import_module("convfactor.measure.count").count
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convfactor.measure' has no attribute {name!r}")

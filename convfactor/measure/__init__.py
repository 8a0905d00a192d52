"""Measurement: counts (params, MACs, FLOPs), latency, and quality metrics."""
from .count import count

__all__ = ["count"]

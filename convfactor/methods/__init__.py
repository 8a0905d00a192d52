"""Factorization methods: one module per method (math, replacement module, cost formula)."""
from .base import Cost, Factorized, Method
from .registry import available, get, register

__all__ = ["Cost", "Factorized", "Method", "available", "get", "register"]

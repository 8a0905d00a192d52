"""convfactor: make trained PyTorch CNNs smaller and faster by low-rank factorization.

Importing the package has no side effects; the public names are loaded lazily.
"""
from __future__ import annotations

import importlib


def _version() -> str:
    """The installed distribution's version; in a source tree that is not installed, pyproject.toml's."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("convfactor")
    except PackageNotFoundError:
        import re
        from pathlib import Path
        try:
            text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
        except OSError:
            return "0+unknown"
        found = re.search(r'(?m)^version\s*=\s*"([^"]+)"', text)
        return found.group(1) if found else "0+unknown"


__version__ = _version()

_EXPORTS = {
    "factorize": "convfactor.compression.api",
    "compress": "convfactor.compression.api",
    "merge": "convfactor.compression.merge",
    "CompressionReport": "convfactor.compression.api",
    "ConvSpec": "convfactor.spec.convspec",
    "UnsupportedLayer": "convfactor.spec.convspec",
    "inspect_model": "convfactor.compression.inspect",
    "count": "convfactor.measure.count",
    "measure_latency": "convfactor.measure.latency",
    "save": "convfactor.io",
    "load": "convfactor.io",
    "load_weights": "convfactor.io",
    "psnr": "convfactor.measure.quality",
    "ssim": "convfactor.measure.quality",
    "accuracy": "convfactor.measure.quality",
    "evbmf": "convfactor.rank.vbmf",
    "plan": "convfactor.rank.planner",
    "Plan": "convfactor.rank.planner",
    "finetune": "convfactor.train.finetune",
    "basis_regularizer": "convfactor.methods.basis",
}
_SUBMODULES = {"models", "methods", "measure", "rank", "train", "data", "report", "io", "files", "spec", "compression",
               "recipes"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"convfactor.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'convfactor' has no attribute {name!r}")


def __dir__():
    return __all__

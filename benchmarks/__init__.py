"""Benchmarks behind ``convfactor bench`` / ``make bench``: one module per BENCHMARKS.md section.

Each section module exposes ``TITLE`` and ``run(quick: bool = False) -> str`` (Markdown, starting
with a ``## `` heading).  Sections whose module is absent are skipped.  ``quick=True`` is the
seconds-long smoke configuration the tests use; the full run is what BENCHMARKS.md holds.
"""
from __future__ import annotations

import importlib

#: section module names, in BENCHMARKS.md order
SECTIONS = [
    "layers",            # method x shape x MAC-ratio speed-ups vs the fastest dense form (issue 2)
    "cp_peers",          # CP-ALS vs TensorLy parafac (issue 2)
    "factorize_speed",   # whole-network factorization time (issue 2)
    "basis",             # filter basis forward implementations and efficiency (issue 3)
    "planner",           # requested vs measured end-to-end speed-ups (issue 4)
    "models",            # quality / speed of compressed zoo models (issue 5)
    "peers",             # TensorLy / TensorLy-Torch side by side (issue 6)
    "im2col",            # im2col + GEMM vs native conv (issue 6)
    "experiments",       # the seeds' headline experiments in miniature (issue 6)
    "tt",                # tensor-train Linear (issue 7)
    "data_aware",        # data-aware vs weight-only fitting (issue 7)
    "lowrank_sparse",    # low-rank + sparse vs low-rank (issue 7)
]


def load_section(name: str):
    """The section module, or None when it is not part of this version."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{name}":
            return None
        raise


def available() -> list[str]:
    return [name for name in SECTIONS if load_section(name) is not None]

"""Benchmarks behind ``python -m benchmarks`` / ``make bench``: one module per BENCHMARKS.md section.

They live outside the installed package (``pip wheel .`` packages ``convfactor*`` only), use only
convfactor's public API, and need the optional ``bench`` extras.  Each section module defines
``SECTION``, a :class:`benchmarks.section.Section` (``measure`` the numbers, ``render`` the
Markdown); :mod:`benchmarks.runner` runs them, stamps them and splices them into BENCHMARKS.md.
Run them from the checkout root (``python -m benchmarks --help``); the installed package never
imports them.  Nothing heavy is imported here (``Section`` loads on first use), so ``python -m
benchmarks`` re-runs itself under a fast allocator before torch is imported.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .section import Section

__all__ = ["SECTIONS", "DEVICE_SECTIONS", "Section", "available", "load_section"]

#: section module names, in BENCHMARKS.md order
SECTIONS = [
    "layers",            # method x shape x MAC-ratio speed-ups vs the fastest dense form (issue 2)
    "cp_peers",          # CP-ALS vs TensorLy parafac (issue 2)
    "factorize_speed",   # whole-network factorization time (issue 2)
    "basis",             # filter basis forward implementations and efficiency (issue 3)
    "planner",           # requested vs measured end-to-end speed-ups (issue 4)
    "models",            # quality / speed of compressed zoo models (issue 5)
    "runtimes",          # the same compressed model on eager / ONNX Runtime / torch.compile (issue 13)
    "int8",              # low rank stacked with static int8 on ONNX Runtime (issue 15)
    "frontier",          # measured speed-up vs quality loss per approach, with a figure (issue 15)
    "esrgan",            # published SRMD / Real-ESRGAN weights: sequential fits, precision, Sedky & Hosmer (issue 22)
    "cuda",              # the published models' low-rank plans and bf16 on a GPU (issue 22; run where CUDA is)
    "peers",             # TensorLy / TensorLy-Torch side by side (issue 6)
    "im2col",            # im2col + GEMM vs native conv (issue 6)
    "experiments",       # the seeds' headline experiments in miniature (issue 6)
    "tt",                # tensor-train Linear (issue 7)
    "data_aware",        # data-aware vs weight-only fitting (issue 7)
    "lowrank_sparse",    # low-rank + sparse vs low-rank (issue 7)
]


def load_section(name: str) -> Section:
    """The :class:`Section` called ``name``; a ValueError for a name not in :data:`SECTIONS`."""
    if name not in SECTIONS:
        raise ValueError(f"no such section {name!r}; available: {', '.join(SECTIONS)}")
    return importlib.import_module(f"{__name__}.{name}").SECTION


def __getattr__(name: str):
    if name == "Section":           # lazily: benchmarks.section imports torch
        from .section import Section
        return Section
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: sections that need a GPU: run only when named (``--sections cuda``); a full run keeps their last text
DEVICE_SECTIONS = ("cuda",)


def available() -> list[str]:
    """The section names, in BENCHMARKS.md order."""
    return list(SECTIONS)

"""Write the compatibility matrix (models x methods) as a Markdown table to stdout.

    .venv/bin/python scripts/compat_matrix.py [--models KEY ...] [--methods M ...] [--reasons] [--threads N]

The cases, layer budgets and checks are those of tests/test_matrix.py (tests/compat_cases.py): each
third-party architecture, randomly initialised with a fixed seed, in float64 at a small input.  A
cell reads ``F/S`` (layers factorized / skipped with a reason at full rank) followed by

* ``ok``: full rank exact (relative output error <= 1e-6), ``macs_ratio=0.5`` ran, and the
  save/load round trip was bit-exact;
* otherwise what failed: ``inexact E`` (full-rank output error E), ``0.5: Error`` (an exception at
  ``macs_ratio=0.5``), ``reload differs``, or ``Error`` (an exception at full rank).

The ONNX column exports the ``channel_svd`` model at ``macs_ratio=0.5`` (float32) for the cases
marked for export.  Run times are this machine's, for all of a row's cells.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pytest  # noqa: E402 - tests/thirdparty.py skips through it when a library is missing
import torch  # noqa: E402

import compat_cases as cc  # noqa: E402


def _short(exc: BaseException) -> str:
    return type(exc).__name__


def cell(model, example, method: str, model_case) -> tuple[str, dict[str, str]]:
    """One cell's text and the skip reasons it met."""
    try:
        _, _, full = cc.run_full_rank(model, example, method)
    except Exception as exc:  # noqa: BLE001 - the matrix reports failures, it does not stop at them
        return f"{_short(exc)}", {}
    notes = [] if full.error is not None and full.error <= cc.EXACT else [f"inexact {full.error:.1e}"]
    try:
        half_model, _, _ = cc.run_macs_ratio(model, example, method)
        with tempfile.TemporaryDirectory() as tmp:
            if not cc.round_trip(half_model, model, example, Path(tmp) / "m"):
                notes.append("reload differs")
    except Exception as exc:  # noqa: BLE001
        notes.append(f"0.5: {_short(exc)}")
    return f"{full.factorized}/{full.skipped} " + (", ".join(notes) or "ok"), full.reasons


def onnx_cell(model, example, model_case) -> str:
    if not model_case.export:
        return "-"
    try:
        half_model, _, _ = cc.run_macs_ratio(model, example, "channel_svd")
        with tempfile.TemporaryDirectory() as tmp:
            error = cc.onnx_error(half_model, example, Path(tmp) / "m.onnx")
    except Exception as exc:  # noqa: BLE001
        return _short(exc)
    return "ok" if error <= 1e-4 else f"error {error:.1e}"


def reason_pattern(reason: str) -> str:
    """A skip reason with its layer names and numbers blanked, so that alike reasons count together."""
    return re.sub(r"(?<![\w.])\d+(\.\d+)?(?!\w)", "N", re.sub(r"`[^`]+`", "`...`", reason))


def row(model_case, methods: list[str], reasons: dict[str, dict[str, int]]) -> list[str]:
    """The table row of one case; adds its skip reasons to ``reasons`` (pattern -> {case: layers})."""
    start = time.perf_counter()
    try:
        model, example = cc.build(model_case)
    except (Exception, pytest.skip.Exception) as exc:  # noqa: BLE001 - e.g. the library is not installed
        return [f"build: {_short(exc)}"] * len(methods) + ["-", "-"]
    cells = []
    for method in methods:
        text, met = cell(model, example, method, model_case)
        cells.append(text)
        for reason in met.values():
            counts = reasons.setdefault(reason_pattern(reason), {})
            counts[model_case.key] = counts.get(model_case.key, 0) + 1
    cells.append(onnx_cell(model, example, model_case))
    cells.append(f"{time.perf_counter() - start:.0f} s")
    return cells


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", help="case keys (default: all)")
    p.add_argument("--methods", nargs="*", default=list(cc.METHODS))
    p.add_argument("--reasons", action="store_true", help="also list the distinct skip reasons")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the tests)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    cases = [c for c in cc.CASES if not args.models or c.key in args.models]
    print("| model | input | " + " | ".join(args.methods) + " | ONNX | time |")
    print("|---|---|" + "---|" * (len(args.methods) + 2))
    reasons: dict[str, dict[str, int]] = {}
    for model_case in cases:
        cells = row(model_case, args.methods, reasons)
        size = "x".join(map(str, model_case.input_shape))
        print(f"| {model_case.key} | {size} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nF/S: layers factorized / skipped with a reason at full rank (float64, seeded random init; at most "
          f"{cc.CHEAP.max_weight:,} weights per layer, {', '.join(cc.EXPENSIVE_METHODS)}: "
          f"{cc.EXPENSIVE.max_layers} layers of at most {cc.EXPENSIVE.max_weight:,}). ok: exact to {cc.EXACT:g}, "
          f"macs_ratio=0.5 ran, save/load bit-exact. torch {torch.__version__}, {args.threads} thread(s).\n")
    for model_case in cases:
        if model_case.note:
            print(f"- {model_case.key}: {model_case.note} ({model_case.spec})")
    if args.reasons:
        print("\nSkip reasons at full rank (layer names and numbers blanked; skipped layers per model, summed over the methods):\n")
        for pattern, counts in sorted(reasons.items()):
            print(f"- {pattern}: " + ", ".join(f"{key} {n}" for key, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

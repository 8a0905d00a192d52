"""The measured half of a report: :func:`collect` builds the data dict that
:func:`convfactor.report.write_report` renders (totals, per-layer costs, spectra, and with
``measure=True`` latency and the speed-up), and :func:`backend_rows` / :func:`latency_rows` turn
speed comparisons into its table rows.  The renderer measures nothing; everything it shows is
counted or timed here."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compression.api import capture_layer_io
from ..compression.inspect import layer_facts
from ..methods.base import Factorized
from ..utils import as_inputs
from .compare import SpeedComparison, compare_speed
from .count import count
from .latency import environment

__all__ = ["collect", "backend_rows", "latency_rows"]


def collect(original, compressed, example_input, *, compression_report=None, measure: bool = False,
            threads: int | None = None, kappa_threshold: float | None = None, title: str | None = None,
            model_name: str | None = None, repeats: int = 10, max_layers: int = 8, spectra: bool = True) -> dict:
    """Report data for ``compressed`` (from ``original``): totals, per-layer costs, spectra of the
    original layers that were factorized (``spectra=True``; needs ``original``'s real weights), and
    with ``measure=True`` latency (whole models and the first ``max_layers`` factorized layers) and
    the speed-up."""
    inputs = as_inputs(example_input)
    data: dict[str, Any] = {"title": title or "convfactor report", "model": model_name,
                            "input_shape": list(inputs[0].shape),
                            "env": environment(threads, batch=int(inputs[0].shape[0]), dtype=str(inputs[0].dtype))}
    if compression_report is not None:
        d = compression_report if isinstance(compression_report, dict) else compression_report.to_dict()
        data["layers"], data["totals"] = d["layers"], d["totals"]
    else:
        data["layers"] = _counted_layers(original, compressed, inputs)
        keys = ("params_before", "params_after", "macs_before", "macs_after")
        data["totals"] = {k: sum(L[k] for L in data["layers"]) for k in keys}
    layer_spectra = _spectra(original, data["layers"]) if spectra else {}
    if layer_spectra:
        data["spectra"] = layer_spectra
        data["kappa_threshold"] = kappa_threshold
    if measure:
        data.update(_measured_speed(original, compressed, inputs, threads, repeats, max_layers))
    return data


def _counted_layers(original: nn.Module, compressed: nn.Module, inputs: tuple) -> list[dict]:
    """Per factorized layer of ``compressed``: method, ranks, params and MACs before and after, counted
    from the modules (when no CompressionReport is at hand)."""
    after = count(compressed, inputs)["layers"]
    before = count(original, inputs)["layers"]
    layers = []
    for name, m in compressed.named_modules():
        if isinstance(m, Factorized):
            macs_after = sum(v["macs"] for k, v in after.items() if k == name or k.startswith(name + "."))
            layers.append({"name": name, "method": m.method, "ranks": list(m.ranks),
                           "params_before": m.spec.dense_params(), "params_after": sum(p.numel() for p in m.parameters()),
                           "macs_before": before.get(name, {}).get("macs", 0), "macs_after": macs_after,
                           "weight_error": None, "output_error": None, "skipped": None})
    return layers


def _spectra(original: nn.Module, layers: list[dict]) -> dict[str, dict]:
    """Singular values, condition number and chosen rank of each listed layer of ``original``."""
    out = {}
    for L in layers:
        try:
            facts = layer_facts(L["name"], original.get_submodule(L["name"]))
        except Exception:  # noqa: BLE001 - a layer without a kernel matrix has no spectrum
            continue
        out[L["name"]] = {"singular_values": facts["singular_values"], "kappa": facts["kappa"],
                          "rank": (L.get("ranks") or [None])[0]}
    return out


def backend_rows(speeds: dict[str, SpeedComparison]) -> list[dict]:
    """One row per timing back-end: fastest forms' medians, the speed-up with its interval, efficiency,
    the compile/export seconds (not in the timings) and the noise reasons."""
    rows = []
    for name, s in speeds.items():
        rows.append({"backend": name, "original_ms": s.original[s.original_best]["median_ms"],
                     "compressed_ms": s.compressed[s.compressed_best]["median_ms"], "speedup": s.speedup,
                     "interval": f"{s.interval[0]:.2f}-{s.interval[1]:.2f}x" if s.interval else None,
                     "efficiency": s.efficiency, "setup_s": sum(s.setup_s.values()) or None,
                     "noise": "; ".join(s.noise) or "no"})
    return rows


def latency_rows(result: SpeedComparison) -> list[dict]:
    """One latency row per model and memory format of a speed comparison."""
    return [dict(label=f"{which} ({form})", median_ms=v["median_ms"], iqr_ms=v["iqr_ms"], env=v["env"])
            for which, forms in (("original", result.original), ("compressed", result.compressed))
            for form, v in forms.items() if isinstance(v, dict)]


@torch.no_grad()
def _measured_speed(original: nn.Module, compressed: nn.Module, inputs: tuple, threads: int | None, repeats: int,
                    max_layers: int) -> dict:
    """``{"speed", "latency"}``: both models end to end, then each of the first ``max_layers`` factorized
    layers against its original on the input it really sees (each in its fastest memory format)."""
    res = compare_speed(original, compressed, inputs, threads=threads, repeats=repeats)
    latency = latency_rows(res)
    names = [n for n, m in compressed.named_modules() if isinstance(m, Factorized)][:max_layers]
    io = capture_layer_io(original, names, inputs)
    for name in (n for n in names if n in io):
        r = compare_speed(original.get_submodule(name), compressed.get_submodule(name), io[name][0],
                          threads=threads, repeats=repeats)
        for which, best, forms in (("dense", r.original_best, r.original),
                                   ("factorized", r.compressed_best, r.compressed)):
            v = forms[best]
            latency.append(dict(label=f"{name} {which}", median_ms=v["median_ms"], iqr_ms=v["iqr_ms"], env=v["env"]))
    return {"speed": res.to_dict(), "latency": latency}

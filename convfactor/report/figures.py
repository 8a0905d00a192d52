"""Report figures as PNG bytes (matplotlib's object API on an Agg canvas: no pyplot, no global
backend switch, nothing happens at import).

Each helper takes plain data (lists / dicts as stored in report.json) and returns PNG bytes.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np

__all__ = ["layer_bars", "spectra", "latency_bars", "crops", "tradeoff", "frontier", "to_png"]

DPI = 100


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def layer_bars(layers: Sequence[dict]) -> bytes:
    """Per-layer params and MACs before / after (log scale). ``layers``: LayerReport dicts."""
    names = [L["name"] for L in layers]
    x = np.arange(len(names))
    fig = _figure(max(6.0, 0.35 * len(names) + 2), 5.5)
    for i, (key, label) in enumerate((("params", "parameters"), ("macs", "MACs (multiply-accumulates)"))):
        ax = fig.add_subplot(2, 1, i + 1)
        ax.bar(x - 0.2, [L[f"{key}_before"] for L in layers], 0.4, label="before", color="#9aa5b1")
        ax.bar(x + 0.2, [L[f"{key}_after"] for L in layers], 0.4, label="after", color="#1f77b4")
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xticks(x)
        ax.set_xticklabels(names if i == 1 else [], rotation=70, fontsize=7)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Per-layer cost before and after")
    return to_png(fig)


def spectra(layer_spectra: dict[str, dict], threshold: float | None = None) -> bytes:
    """Normalized singular values per layer (left) and kappa per layer with the threshold (right).

    ``layer_spectra``: ``name -> {'singular_values': [...], 'kappa': float, 'rank': int | None}``.
    """
    names = list(layer_spectra)
    fig = _figure(12, 4.5)
    ax = fig.add_subplot(1, 2, 1)
    for name in names:
        s = np.asarray(layer_spectra[name]["singular_values"], dtype=float)
        if s.size and s[0] > 0:
            line, = ax.semilogy(np.arange(1, s.size + 1), s / s[0], lw=1, label=name)
            r = layer_spectra[name].get("rank")
            if r:
                ax.plot([r], [s[min(r, s.size) - 1] / s[0]], "o", color=line.get_color(), ms=4)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / largest")
    ax.set_title("Singular-value spectra (dots: chosen rank)")
    if len(names) <= 12:
        ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    kappas = [min(layer_spectra[n]["kappa"], 1e300) for n in names]
    colors = ["#d62728" if threshold is not None and k > threshold else "#1f77b4" for k in kappas]
    ax.bar(np.arange(len(names)), kappas, color=colors)
    ax.set_yscale("log")
    if threshold is not None:
        ax.axhline(threshold, color="#d62728", ls="--", lw=1, label=f"threshold kappa = {threshold:g}")
        ax.legend(fontsize=8)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=70, fontsize=7)
    ax.set_ylabel("condition number kappa = s_max / s_min")
    ax.set_title("Condition number per layer")
    return to_png(fig)


def latency_bars(rows: Sequence[dict], title: str = "Measured latency") -> bytes:
    """``rows``: ``{'label', 'median_ms', 'iqr_ms'}``; bars with IQR whiskers."""
    labels = [r["label"] for r in rows]
    fig = _figure(max(6.0, 0.6 * len(rows) + 2), 4)
    ax = fig.add_subplot(1, 1, 1)
    med = [r["median_ms"] for r in rows]
    iqr = [r.get("iqr_ms", 0.0) / 2 for r in rows]
    ax.bar(np.arange(len(rows)), med, yerr=iqr, capsize=3, color="#2ca02c")
    for i, m in enumerate(med):
        ax.text(i, m, f"{m:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(rows)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("median ms (whiskers: IQR)")
    ax.set_title(title)
    return to_png(fig)


def crops(images: Sequence[dict]) -> bytes:
    """Side-by-side crops: ``{'label', 'array': HxW or HxWx3 floats in [0, 1], 'psnr': float | None}``."""
    n = len(images)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _figure(3 * cols, 3.2 * rows)
    for i, item in enumerate(images):
        ax = fig.add_subplot(rows, cols, i + 1)
        a = np.clip(np.asarray(item["array"], dtype=float), 0, 1)
        ax.imshow(a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        psnr = item.get("psnr")
        ax.set_title(item["label"] + (f"\nPSNR {psnr:.2f} dB" if psnr is not None else ""), fontsize=9)
        ax.axis("off")
    return to_png(fig)


def tradeoff(points: Sequence[dict], quality_name: str = "quality") -> bytes:
    """Quality vs MACs (left) and vs latency (right) across operating points.

    ``points``: ``{'label', 'macs', 'latency_ms' (optional), 'quality'}``.
    """
    fig = _figure(11, 4.2)
    for i, (key, xlabel) in enumerate((("macs", "MACs (multiply-accumulates)"), ("latency_ms", "median latency (ms)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        pts = [p for p in points if p.get(key) is not None and p.get("quality") is not None]
        groups: dict[str, list[dict]] = {}
        for p in pts:
            groups.setdefault(p.get("group", p["label"].split("@")[0].strip()), []).append(p)
        for group, members in groups.items():
            members = sorted(members, key=lambda p: p[key])
            ax.plot([p[key] for p in members], [p["quality"] for p in members], "o-", ms=4, label=group)
            for p in members:
                ax.annotate(p["label"], (p[key], p["quality"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(quality_name)
        ax.grid(alpha=0.3)
        if not pts:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        elif len(groups) <= 10:
            ax.legend(fontsize=7)
    fig.suptitle(f"{quality_name} vs MACs vs latency")
    return to_png(fig)


def frontier(points: Sequence[dict], references: Sequence[dict] = (), title: str = "Speed / quality frontier",
             loss_name: str = "PSNR-Y loss (dB)") -> bytes:
    """Measured speed-up (x) against quality loss (y, lower is better), one line per approach.

    ``points``: ``{'group', 'speedup', 'loss', 'label'?, 'interval'?: (lo, hi)}``; each group is drawn
    in speed-up order (horizontal whiskers: the interval).  ``references``: published marks
    ``{'label', 'loss', 'x'?}``: drawn as hollow diamonds at ``x`` (what ``x`` is belongs in the label:
    a params or MACs ratio is not a measured speed-up), or, without ``x``, as dotted horizontal lines.
    """
    fig = _figure(8, 5)
    ax = fig.add_subplot(1, 1, 1)
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(p["group"], []).append(p)
    for group, members in groups.items():
        members = sorted(members, key=lambda p: p["speedup"])
        xs, ys = [p["speedup"] for p in members], [p["loss"] for p in members]
        line, = ax.plot(xs, ys, "o-", ms=5, label=group)
        for p in members:
            if p.get("interval"):
                lo, hi = p["interval"]
                ax.plot([lo, hi], [p["loss"]] * 2, "-", lw=3, alpha=0.35, color=line.get_color())
            if p.get("label"):
                ax.annotate(p["label"], (p["speedup"], p["loss"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    for ref in references:
        if ref.get("x") is None:
            ax.axhline(ref["loss"], ls=":", lw=1, color="#7f7f7f")
            ax.annotate(ref["label"], (0.01, ref["loss"]), xycoords=("axes fraction", "data"), fontsize=8,
                        color="#555555", xytext=(0, 2), textcoords="offset points")
        else:
            ax.plot([ref["x"]], [ref["loss"]], "D", mfc="none", color="#555555", ms=7)
            ax.annotate(ref["label"], (ref["x"], ref["loss"]), fontsize=8, color="#555555", xytext=(4, -8),
                        textcoords="offset points")
    if not points:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("measured speed-up (x), against the same back-end's fastest dense form")
    ax.set_ylabel(loss_name + ", lower is better")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=7)
    ax.set_title(title)
    return to_png(fig)

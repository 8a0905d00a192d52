"""im2col + GEMM vs the native convolution: time and peak activation memory.

Sedky & Hosmer found im2col "too memory intensive and slower than the original implementation";
this section measures both claims on the layer shapes of shared/README.md.
"""
from __future__ import annotations

import statistics

import torch
from torch import nn

from convfactor.measure.compare import compare_speed
from convfactor.measure.latency import burn_in
from convfactor.measure.memory import peak_memory
from convfactor.spec.im2col import Im2ColConv2d

from .markdown import NOISY_NOTE, heading, noisy_mark, table
from .section import Section

TITLE = "im2col + GEMM vs native convolution"

#: (C=N, kernel, H=W) -- the shapes of the layer-speed table in shared/README.md
SHAPES = [(64, 3, 128), (128, 3, 64), (256, 3, 28), (512, 3, 14), (64, 5, 64)]
QUICK_SHAPES = [(16, 3, 16), (8, 5, 16)]


def measure_shape(channels: int, kernel: int, size: int, *, repeats: int, threads: int | None = None) -> dict:
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2).eval()
    im2col = Im2ColConv2d.from_conv(conv)
    x = torch.randn(1, channels, size, size)
    with torch.no_grad():
        err = ((im2col(x) - conv(x)).norm() / conv(x).norm()).item()
    res = compare_speed(conv, im2col, x, threads=threads, repeats=repeats, rounds=3)
    mem_native = peak_memory(conv, x, threads=threads)
    mem_im2col = peak_memory(im2col, x, threads=threads)
    return {"shape": f"{channels}->{channels} {kernel}x{kernel} @{size}x{size}", "macs": res.macs_original,
            "native_ms": res.original[res.original_best]["median_ms"], "native_form": res.original_best,
            "im2col_ms": res.compressed[res.compressed_best]["median_ms"], "im2col_form": res.compressed_best,
            "time_ratio": 1.0 / res.speedup, "native_peak": mem_native["peak_bytes"],
            "im2col_peak": mem_im2col["peak_bytes"], "output_bytes": mem_native["output_bytes"], "rel_err": err,
            "env": res.env, "noisy": res.noisy}


def measure(quick: bool = False) -> list[dict]:
    """One :func:`measure_shape` dict per shape."""
    shapes = QUICK_SHAPES if quick else SHAPES
    if not quick:
        burn_in(3.0)
    return [measure_shape(c, k, s, repeats=3 if quick else 15) for c, k, s in shapes]


def _cells(r: dict) -> list:
    mb = 2 ** 20
    return [r["shape"], f"{r['macs'] / 1e6:.0f} M", f"{r['native_ms']:.3f} ({r['native_form']})",
            f"{r['im2col_ms']:.3f} ({r['im2col_form']})", f"{r['time_ratio']:.2f}x{noisy_mark(r['noisy'])}",
            f"{r['native_peak'] / mb:.2f}", f"{r['im2col_peak'] / mb:.2f}",
            f"{r['im2col_peak'] / max(1, r['native_peak']):.1f}x", f"{r['rel_err']:.1e}"]


def _verdict(rows: list[dict]) -> str:
    slower = sum(r["time_ratio"] > 1 for r in rows)
    med_t = statistics.median(r["time_ratio"] for r in rows)
    med_m = statistics.median(r["im2col_peak"] / max(1, r["native_peak"]) for r in rows)
    verdict = ("reproduced" if slower > len(rows) / 2 and med_m > 1.5 else
               "partly reproduced" if slower > len(rows) / 2 or med_m > 1.5 else "refuted")
    return (f"im2col was slower on {slower} of {len(rows)} shapes (median time ratio {med_t:.2f}x) and "
            f"needed a median {med_m:.1f}x the native peak activation memory (its column buffer holds "
            f"kh*kw copies of the input). Sedky & Hosmer's finding (slower and memory intensive) is "
            f"**{verdict}** on this machine.")


def render(rows: list[dict]) -> str:
    env = rows[0]["env"]
    lines = [*heading(TITLE),
             f"Batch 1, {env['dtype']}, {env['threads']} threads, {env['cpu']}, torch {env['torch']}. "
             "Times: median of repeats after warm-up, interleaved in one process; each implementation in its "
             "fastest memory format. Peak memory: the peak of live operator outputs during the forward pass, inputs and "
             "weights excluded (`convfactor.measure.memory.peak_memory`; it sees im2col's column buffer, not a native "
             "kernel's private scratch, so the native figure is a lower bound).", "",
             *table(["layer", "MACs", "native ms (form)", "im2col ms (form)", "im2col time / native", "native peak MiB",
                     "im2col peak MiB", "im2col memory / native", "rel. error"], map(_cells, rows))]
    if any(r["noisy"] for r in rows):
        lines += ["", NOISY_NOTE]
    lines += ["", _verdict(rows), ""]
    return "\n".join(lines)


SECTION = Section("im2col", TITLE, measure, render)

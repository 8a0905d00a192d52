"""TT-Linear vs dense ``nn.Linear`` on VGG-sized FC layers (Novikov et al. 2015, the lecture's timing table).

Shapes 25088x4096 (VGG fc6, modes 2x7x8x8x7x4 -> 4x4x4x4x4x4 as in the paper) and 4096x4096
(fc7, 4^6 -> 4^6), all TT-ranks 4 and 8, batch 1 and 100, float32, threads set explicitly.  The TT
cores are random (speed does not depend on the values; a TT-SVD of a random 25088x4096 matrix would
only cost minutes and give a poor approximation anyway).  The dense baseline is ``nn.Linear``
(its only memory format).  Each figure is a median of repeats after warm-up, both forms timed in
one process; a CUDA device, when present, adds the GPU rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from convfactor.measure.latency import burn_in, environment, measure_latency
from convfactor.methods.tt import TTLinear, tt_macs

from .markdown import heading, table
from .section import Section

TITLE = "Tensor-train Linear vs dense Linear"

FULL_LAYERS = [("fc6 25088x4096", (2, 7, 8, 8, 7, 4), (4, 4, 4, 4, 4, 4)),
               ("fc7 4096x4096", (4, 4, 4, 4, 4, 4), (4, 4, 4, 4, 4, 4))]
QUICK_LAYERS = [("392x256", (2, 7, 4, 7), (4, 4, 4, 4))]
LECTURE = "lecture (Novikov et al. 2015, fc6, TT-rank 4): CPU 1 image FC 16.1 ms vs TT 1.2 ms; GPU 100 images 33 ms vs 12.9 ms"
THREADS = 2


def _time(module, x, threads, quick):
    lat = measure_latency(module, x, threads=threads, repeats=3 if quick else 11, warmup=1 if quick else 3,
                          min_run_time=0.0 if quick else 0.2)
    return lat.median_ms


@dataclass
class Row:
    """One (device, layer, batch, TT-rank): both forms' median ms, MACs per input vector and params."""
    device: str
    layer: str
    batch: int
    rank: int
    dense_ms: float
    tt_ms: float
    dense_macs: int
    tt_macs: int
    dense_params: int
    tt_params: int


def _layer_rows(device: str, name: str, in_modes: tuple, out_modes: tuple, ranks, batches, threads: int,
                quick: bool, gen: torch.Generator) -> list[Row]:
    n_in, n_out = math.prod(in_modes), math.prod(out_modes)
    dense = nn.Linear(n_in, n_out).to(device).eval()
    rows = []
    for batch in batches:
        x = torch.randn(batch, n_in, generator=gen).to(device)
        t_dense = _time(dense, x, threads, quick)
        for r in ranks:
            tt_ranks = (r,) * (len(in_modes) - 1)
            tt = TTLinear(in_modes, out_modes, tt_ranks).to(device).eval()
            rows.append(Row(device, name, batch, r, t_dense, _time(tt, x, threads, quick), n_in * n_out,
                            tt_macs(in_modes, out_modes, tt_ranks), (n_in + 1) * n_out,
                            sum(p.numel() for p in tt.parameters())))
    return rows


@dataclass
class Results:
    threads: int
    env: dict
    rows: list[Row]


def measure(quick: bool = False) -> Results:
    layers = QUICK_LAYERS if quick else FULL_LAYERS
    ranks = (4,) if quick else (4, 8)
    batches = (1, 100) if not quick else (1, 8)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not quick else [])
    threads = 1 if quick else THREADS          # a smoke run: one thread is steadier on a busy CPU
    if not quick:
        burn_in(3.0, threads)
    gen = torch.Generator().manual_seed(0)
    rows = [row for device in devices for name, in_modes, out_modes in layers
            for row in _layer_rows(device, name, in_modes, out_modes, ranks, batches, threads, quick, gen)]
    return Results(threads, environment(threads, dtype="float32"), rows)


def render(results: Results) -> str:
    env, threads = results.env, results.threads
    lines = [*heading(TITLE),
             f"{LECTURE}. Here: float32, {threads} threads on CPU, median of repeats; random TT cores "
             f"(speed only). MACs per input vector.", "",
             *table(["device", "layer", "batch", "dense ms", "TT-rank", "TT ms", "speed-up", "dense MACs", "TT MACs",
                     "params dense -> TT"],
                    ([r.device, r.layer, r.batch, f"{r.dense_ms:.3f}", r.rank, f"{r.tt_ms:.3f}",
                      f"{r.dense_ms / r.tt_ms:.1f}x", f"{r.dense_macs / 1e6:.1f}M", f"{r.tt_macs / 1e6:.3f}M",
                      f"{r.dense_params / 1e6:.1f}M -> {r.tt_params / 1e3:.1f}k"] for r in results.rows))]
    lines += ["", f"Environment: {env['cpu']}, torch {env['torch']}, {threads} threads"
              + (f", GPU {env['cuda_device']}" if "cuda_device" in env else "") + "."]
    return "\n".join(lines) + "\n"


SECTION = Section("tt", TITLE, measure, render)

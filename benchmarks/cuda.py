"""The published models on a GPU (issue 22): the same low-rank plans timed with CUDA events, eager PyTorch.

Run where CUDA is: ``python -m benchmarks --update --sections cuda -o BENCHMARKS.md``.  Elsewhere the
section says it was not measured (and keeps no figures).  Models: SRMD x2 (its ten 128 -> 128 convs
by channel SVD rank 48 and rank 32) and realesrgan_x4plus (every conv but the image-facing ones at half
its MACs by channel SVD).  The factors are fitted to the weights here: speed depends on the ranks alone,
and the quality of each fit is measured on CPU in the esrgan section (this keeps the section free of
the photo set's scikit-image, which a GPU machine may lack).  Each is timed
against its own dense model in fp32 (TF32 as PyTorch's defaults allow for convolutions) and in bf16
(the models cast to bfloat16), and the dense bf16 model against the dense fp32 one: batch 1, both
memory formats, the fastest of each, interleaved rounds, 95% bootstrap intervals.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from convfactor import models
from convfactor.compression.api import compress
from convfactor.measure.compare import SpeedComparison, compare_speed
from convfactor.measure.latency import environment
from convfactor.models import published

from .markdown import heading, noisy_mark, table
from .section import Section

TITLE = "Published models on a GPU: low rank and bf16 under eager PyTorch (CUDA)"

FULL = dict(srmd_side=256, rrdb_side=128, repeats=20, srmd_ranks=(48, 32), rrdb_ratio=0.5,
            models=("srmd_x2", "realesrgan_x4plus"))
QUICK = dict(srmd_side=16, rrdb_side=12, repeats=2, srmd_ranks=(8,), rrdb_ratio=0.5,
             models=("srmd_x2", "rrdbnet_x4"))          # quick: a one-block RRDBNet, random weights


@dataclass
class Row:
    model: str
    plan: str
    precision: str                 # "fp32", "bf16" or "bf16 vs fp32" (dense against dense)
    comparison: SpeedComparison
    fit_s: float = 0.0


@dataclass
class Results:
    quick: bool
    device: str
    env: dict = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    missing: str | None = None
    total_s: float = 0.0


def _time(original, compressed, x, repeats: int) -> SpeedComparison:
    with torch.no_grad():
        return compare_speed(original, compressed, x, repeats=repeats, rounds=3, max_rounds=8, backend="torch")


def _rows(name: str, plan: str, model: nn.Module, compressed: nn.Module, x: torch.Tensor, cfg: dict,
          fit_s: float) -> list[Row]:
    """fp32 and bf16 speed-ups of ``compressed`` against ``model`` (each in that precision)."""
    out = [Row(name, plan, "fp32", _time(model, compressed, x, cfg["repeats"]), fit_s)]
    half = lambda m: copy.deepcopy(m).to(torch.bfloat16)       # noqa: E731
    out.append(Row(name, plan, "bf16", _time(half(model), half(compressed), x.to(torch.bfloat16), cfg["repeats"]),
                   fit_s))
    return out


def _srmd(res: Results, cfg: dict, device: str, quick: bool) -> None:
    model = models.get("srmd_x2", pretrained=not quick or published.installed("srmd_x2")).eval().to(device)
    middle = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1:-1]
    x = torch.rand(1, 3, cfg["srmd_side"], cfg["srmd_side"], generator=torch.Generator().manual_seed(0)).to(device)
    dense_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    res.rows.append(Row("srmd_x2", "dense", "bf16 vs fp32", _mixed(model, dense_bf16, x, cfg["repeats"])))
    for rank in cfg["srmd_ranks"]:
        t0 = time.perf_counter()
        compressed, _ = compress(model, [{"op_names": middle, "method": "channel_svd", "rank": rank}], x)
        res.rows += _rows("srmd_x2", f"channel_svd rank {rank}", model, compressed.eval(), x, cfg,
                          time.perf_counter() - t0)


def _mixed(fp32: nn.Module, bf16: nn.Module, x: torch.Tensor, repeats: int) -> SpeedComparison:
    """The dense bf16 model against the dense fp32 one (each fed its own dtype)."""
    class _Cast(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return self.inner(t.to(torch.bfloat16))
    return _time(fp32, _Cast(bf16), x, repeats)


def _rrdb(res: Results, cfg: dict, device: str, quick: bool) -> None:
    name = cfg["models"][1]
    torch.manual_seed(0)
    model = (models.get(name, num_blocks=1, feats=16, grow=8) if quick else models.get(name, pretrained=True))
    model = model.eval().to(device)
    keep = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and min(m.in_channels, m.out_channels) <= 4]
    x = torch.rand(1, 3, cfg["rrdb_side"], cfg["rrdb_side"], generator=torch.Generator().manual_seed(0)).to(device)
    res.rows.append(Row(name, "dense", "bf16 vs fp32", _mixed(model, copy.deepcopy(model).to(torch.bfloat16), x,
                                                              cfg["repeats"])))
    t0 = time.perf_counter()
    compressed, _ = compress(model, [{"op_types": ["Conv2d"], "method": "channel_svd", "macs_ratio": cfg["rrdb_ratio"],
                                      "exclude_op_names": keep}], x)
    res.rows += _rows(name, f"channel_svd at {cfg['rrdb_ratio']:g} of each conv's MACs", model, compressed.eval(), x,
                      cfg, time.perf_counter() - t0)


def measure(quick: bool = False, device: str | None = None) -> Results:
    """On ``device`` (default: CUDA when present; quick runs may pass "cpu" to check the logic)."""
    device = device or ("cuda" if torch.cuda.is_available() else None)
    cfg = QUICK if quick else FULL
    if device is None:
        return Results(quick, "none", missing="no CUDA device on this machine; run this section where one is")
    if not quick and not all(published.installed(n) for n in cfg["models"]):
        return Results(quick, device, missing=f"the published wheels are not installed ({published.INSTALL_HINT})")
    t0 = time.perf_counter()
    res = Results(quick, torch.cuda.get_device_name() if device == "cuda" else device, environment(1))
    _srmd(res, cfg, device, quick)
    _rrdb(res, cfg, device, quick)
    res.total_s = time.perf_counter() - t0
    return res


def render(res: Results) -> str:
    lines = heading(TITLE)
    if res.missing:
        return "\n".join(lines + [f"Not measured: {res.missing}.", ""])
    cfg = QUICK if res.quick else FULL
    env = res.env
    lines += [f"Device: {res.device}; torch {env.get('torch')}; batch 1; SRMD x2 at {cfg['srmd_side']}² LR, RRDBNet "
              f"at {cfg['rrdb_side']}² LR; CUDA events around each call after warm-up; speed-up = the original's "
              "fastest form / the compressed model's fastest form, in the same precision (bf16 vs fp32: the dense "
              "model cast to bf16 against itself in fp32). MACs are multiply-accumulates, not time.", ""]
    rows = []
    for r in res.rows:
        s = r.comparison
        lo, hi = s.interval or (s.speedup, s.speedup)
        macs = f"{s.macs_reduction:.2f}" if s.macs_reduction and r.plan != "dense" else "-"
        ms = f"{s.original[s.original_best]['median_ms']:.2f} -> {s.compressed[s.compressed_best]['median_ms']:.2f}"
        rows.append([r.model, r.plan, r.precision, macs, ms, f"**{s.speedup:.2f}x** ({lo:.2f}-{hi:.2f}){noisy_mark(s.noisy)}"])
    lines += table(["model", "plan", "precision", "MACs reduction (x)", "ms (original -> compressed)",
                    "measured speed-up (95% interval)"], rows)
    lines += ["", f"The section took {res.total_s:.0f} s.", ""]
    return "\n".join(lines)


SECTION = Section("cuda", TITLE, measure, render)

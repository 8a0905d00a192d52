"""Peers side by side in one run: TensorLy and TensorLy-Torch vs convfactor at equal rank.

* TensorLy ``parafac`` / ``partial_tucker`` on one conv kernel: decomposition time and relative
  kernel error, next to convfactor's ``cp`` / ``tucker2`` factorizations of the same kernel.
* TensorLy-Torch ``FactorizedConv.from_conv(..., implementation='factorized')``: init time, forward
  speed-up against the dense layer's fastest form, and output error, next to
  ``convfactor.factorize(conv, 'cp', rank=r)``.

The peers are bench-only extras (``pip install convfactor[bench]``); a missing peer is reported
as such instead of failing the section.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from convfactor.compression.api import factorize
from convfactor.measure.compare import compare_speed
from convfactor.measure.latency import burn_in, environment
from convfactor.methods import registry
from convfactor.spec.convspec import ConvSpec

from .markdown import NOISY_NOTE, heading, noisy_mark, table
from .section import Section

TITLE = "Peers: TensorLy and TensorLy-Torch vs convfactor"

FULL = {"kernel": (256, 256, 3, 3), "cp_rank": 64, "tucker_rank": 64, "n_iter": 100,
        "layer": (128, 28), "layer_rank": 140, "repeats": 15}
QUICK = {"kernel": (16, 16, 3, 3), "cp_rank": 8, "tucker_rank": 8, "n_iter": 5,
         "layer": (16, 8), "layer_rank": 8, "repeats": 3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def structured_kernel(shape, terms: int, generator: torch.Generator) -> torch.Tensor:
    """A kernel with a decaying spectrum: ``sum_i 0.97^i a_i o b_i o h_i o v_i`` (unit factors) + 1% noise."""
    n, c, kh, kw = shape
    lam = 0.97 ** torch.arange(terms, dtype=torch.float64)
    fs = [torch.nn.functional.normalize(torch.randn(d, terms, generator=generator, dtype=torch.float64), dim=0)
          for d in shape]
    w = torch.einsum("r,nr,cr,hr,wr->nchw", lam, *fs)
    w = w + 0.01 * w.norm() / w.numel() ** 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)
    return (w / w.norm() * (n * c * kh * kw) ** 0.5 / (c * kh * kw) ** 0.5).float()


def _timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _tensorly_rows(w: torch.Tensor, cfg: dict) -> list[dict]:
    """TensorLy ``parafac`` and ``partial_tucker`` (torch backend) of ``w``: time and kernel error, or why not."""
    r, rt = cfg["cp_rank"], cfg["tucker_rank"]
    try:
        import tensorly as tl
        from tensorly.decomposition import parafac, partial_tucker
    except ImportError as exc:
        missing = f"n/a (tensorly not installed: {exc})"
        return [{"what": "TensorLy parafac (pytorch)", "rank": r, "note": missing},
                {"what": "TensorLy partial_tucker", "rank": f"{rt},{rt}", "note": missing}]
    # the numpy backend is 2-3x slower (shared/README.md); cp_peers has both
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the layer's own float32, as a user would
        cp, cp_s = _timed(parafac, tl.tensor(w.clone()), r, n_iter_max=cfg["n_iter"], init="svd", tol=0)
        cp_rec = torch.as_tensor(tl.to_numpy(tl.cp_to_tensor(cp)))
        res, tucker_s = _timed(partial_tucker, tl.tensor(w.clone()), rank=[rt, rt], modes=[0, 1],
                               n_iter_max=cfg["n_iter"])
        core, factors = res[0] if isinstance(res[0], (tuple, list)) else res
        tucker_rec = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
    return [{"what": f"TensorLy parafac (pytorch), {cfg['n_iter']} iterations", "rank": r, "seconds": cp_s,
             "error": _rel(cp_rec, w)},
            {"what": "TensorLy partial_tucker (pytorch)", "rank": f"{rt},{rt}", "seconds": tucker_s,
             "error": _rel(torch.as_tensor(tucker_rec), w)}]


def _ours_row(name: str, w: torch.Tensor, spec: ConvSpec, rank: int, label) -> dict:
    """convfactor's ``name`` at ``rank``: time and kernel error."""
    method = registry.get(name)
    factors, seconds = _timed(method.factorize, w.double(), spec, method.expand_rank(spec, rank))
    return {"what": f"convfactor {name}", "rank": label, "seconds": seconds, "error": _rel(method.reconstruct(factors, spec), w)}


def kernel_rows(cfg: dict) -> list[dict]:
    """Time and kernel error of CP and Tucker-2 at equal rank: TensorLy vs convfactor."""
    g = torch.Generator().manual_seed(0)
    n, c, kh, kw = cfg["kernel"]
    conv = nn.Conv2d(c, n, (kh, kw), padding=(kh // 2, kw // 2), bias=False)
    with torch.no_grad():
        conv.weight.copy_(structured_kernel((n, c, kh, kw), 4 * cfg["cp_rank"], g))
    w = conv.weight.detach()
    spec = ConvSpec.from_module(conv)
    r, rt = cfg["cp_rank"], cfg["tucker_rank"]
    tl_cp, tl_tucker = _tensorly_rows(w, cfg)
    rows = [tl_cp, _ours_row("cp", w, spec, r, r), tl_tucker, _ours_row("tucker2", w, spec, rt, f"{rt},{rt}")]
    s, seconds = _timed(torch.linalg.svdvals, w.reshape(n, -1))
    rows.append({"what": "reference: truncated SVD (channel_svd) of the same kernel", "rank": r, "seconds": seconds,
                 "error": (s[r:].pow(2).sum() / s.pow(2).sum()).sqrt().item()})
    return rows


def _layer_candidates(conv: nn.Conv2d, r: int) -> tuple[list, list[dict]]:
    """``([(label, make the layer)], [rows of peers not installed])``: TensorLy-Torch's CP conv and ours."""
    candidates, missing = [], []
    try:
        import tltorch

        def make_tltorch():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return tltorch.FactorizedConv.from_conv(conv, rank=r, factorization="cp", implementation="factorized")
        candidates.append(("TensorLy-Torch FactorizedConv.from_conv (CP, 'factorized')", make_tltorch))
    except ImportError as exc:
        missing.append({"what": "TensorLy-Torch FactorizedConv", "rank": r, "note": f"n/a (tltorch not installed: {exc})"})
    candidates.append(("convfactor factorize(conv, 'cp')", lambda: factorize(conv, "cp", rank=r)))
    return candidates, missing


def layer_rows(cfg: dict) -> list[dict]:
    """TensorLy-Torch FactorizedConv vs convfactor's CP as layers: init time, speed-up, output error."""
    ch, size = cfg["layer"]
    r = cfg["layer_rank"]
    torch.manual_seed(0)
    conv = nn.Conv2d(ch, ch, 3, padding=1).eval()
    with torch.no_grad():
        conv.weight.copy_(structured_kernel((ch, ch, 3, 3), 4 * r, torch.Generator().manual_seed(1)))
    x = torch.randn(1, ch, size, size)
    with torch.no_grad():
        ref = conv(x)
    if cfg is not QUICK:
        burn_in(3.0)
    candidates, rows = _layer_candidates(conv, r)
    for label, make in candidates:
        layer, init = _timed(make)
        layer.eval()
        with torch.no_grad():
            err = _rel(layer(x), ref)
            res = compare_speed(conv, layer, x, repeats=cfg["repeats"], rounds=3)
        rows.append({"what": label, "rank": r, "seconds": init, "error": err, "speedup": res.speedup, "noisy": res.noisy,
                     "forms": f"{res.original_best} / {res.compressed_best}",
                     "params": sum(p.numel() for p in layer.parameters())})
    return rows


@dataclass
class Results:
    cfg: dict
    env: dict
    kernel: list[dict]          # :func:`kernel_rows`
    layer: list[dict]           # :func:`layer_rows`


def measure(quick: bool = False) -> Results:
    cfg = QUICK if quick else FULL
    env = environment(torch.get_num_threads())
    return Results(cfg, env, kernel_rows(cfg), layer_rows(cfg))


def _kernel_cells(row: dict) -> list:
    if "note" in row:
        return [row["what"], row["rank"], row["note"], ""]
    return [row["what"], row["rank"], f"{row['seconds']:.3f}", f"{row['error']:.4f}"]


def _layer_cells(row: dict, dense_params: int) -> list:
    if "note" in row:
        return [row["what"], row["note"], "", "", ""]
    return [row["what"], f"{row['seconds']:.2f}", f"{row['speedup']:.2f}x{noisy_mark(row['noisy'])} ({row['forms']})",
            f"{row['error']:.4f}", f"{row['params']} (dense {dense_params})"]


def render(results: Results) -> str:
    cfg, env = results.cfg, results.env
    n, c, kh, kw = cfg["kernel"]
    ch, size = cfg["layer"]
    lines = [*heading(TITLE),
             f"{env['threads']} threads, {env['cpu']}, torch {env['torch']}. Same process, same inputs.", "",
             f"### Decomposing one {n}x{c}x{kh}x{kw} kernel at equal rank", "",
             *table(["implementation", "rank", "seconds", "relative kernel error"], map(_kernel_cells, results.kernel)),
             "", f"The kernel is synthetic with a decaying spectrum (a sum of {4 * cfg['cp_rank']} seeded random "
             "rank-1 terms with weights 0.97^i, plus 1% noise); no trained weights ship offline. Equal rank, "
             "equal data, one process.", "",
             f"### As a layer: {ch}->{ch} 3x3 @{size}x{size}, batch 1, CP rank {cfg['layer_rank']}", "",
             *table(["implementation", "init seconds", "speed-up vs dense (fastest forms: dense / factorized)",
                     "output rel. error", "params"],
                    (_layer_cells(row, ch * ch * 9 + ch) for row in results.layer))]
    if any(row.get("noisy") for row in results.layer):
        lines += ["", NOISY_NOTE]
    lines.append("")
    return "\n".join(lines)


SECTION = Section("peers", TITLE, measure, render)

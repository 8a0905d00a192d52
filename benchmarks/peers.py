"""Peers side by side in one run: TensorLy and TensorLy-Torch vs convfactor at equal rank.

* TensorLy ``parafac`` / ``partial_tucker`` on one conv kernel: decomposition time and relative
  kernel error, next to convfactor's ``cp`` / ``tucker2`` factorizations of the same kernel.
* TensorLy-Torch ``FactorizedConv.from_conv(..., implementation='factorized')``: init time, forward
  speed-up against the dense layer's fastest form, and output error, next to
  ``convfactor.factorize(conv, 'cp', rank=r)``.

The peers are bench-only extras (``pip install convfactor[bench]``); a missing peer or method is
reported as such instead of failing the section.
"""
from __future__ import annotations

import time
import warnings

import torch
from torch import nn

TITLE = "Peers: TensorLy and TensorLy-Torch vs convfactor"

FULL = {"kernel": (256, 256, 3, 3), "cp_rank": 64, "tucker_rank": 64, "n_iter": 100,
        "layer": (128, 28), "layer_rank": 140, "repeats": 15}
QUICK = {"kernel": (16, 16, 3, 3), "cp_rank": 8, "tucker_rank": 8, "n_iter": 5,
         "layer": (16, 8), "layer_rank": 8, "repeats": 3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ours(name: str):
    from convfactor.methods import registry
    try:
        return registry.get(name), None
    except Exception as exc:  # noqa: BLE001 - a method another issue provides may be absent
        return None, f"n/a ({name}: {exc})"


def structured_kernel(shape, terms: int, generator: torch.Generator) -> torch.Tensor:
    """A kernel with a decaying spectrum: ``sum_i 0.97^i a_i o b_i o h_i o v_i`` (unit factors) + 1% noise."""
    n, c, kh, kw = shape
    lam = 0.97 ** torch.arange(terms, dtype=torch.float64)
    fs = [torch.nn.functional.normalize(torch.randn(d, terms, generator=generator, dtype=torch.float64), dim=0)
          for d in shape]
    w = torch.einsum("r,nr,cr,hr,wr->nchw", lam, *fs)
    w = w + 0.01 * w.norm() / w.numel() ** 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)
    return (w / w.norm() * (n * c * kh * kw) ** 0.5 / (c * kh * kw) ** 0.5).float()


def kernel_rows(cfg: dict) -> list[dict]:
    """Time and kernel error of CP and Tucker-2 at equal rank: TensorLy vs convfactor."""
    from convfactor.spec.convspec import ConvSpec
    g = torch.Generator().manual_seed(0)
    n, c, kh, kw = cfg["kernel"]
    conv = nn.Conv2d(c, n, (kh, kw), padding=(kh // 2, kw // 2), bias=False)
    with torch.no_grad():
        conv.weight.copy_(structured_kernel((n, c, kh, kw), 4 * cfg["cp_rank"], g))
    w = conv.weight.detach()
    spec = ConvSpec.from_module(conv)
    rows = []
    try:
        import tensorly as tl
        from tensorly.decomposition import parafac, partial_tucker
    except ImportError as exc:
        tl = None
        missing = f"n/a (tensorly not installed: {exc})"
    r, rt = cfg["cp_rank"], cfg["tucker_rank"]
    for backend in ("pytorch",):           # the numpy backend is 2-3x slower (shared/README.md); cp_peers has both
        if tl is None:
            rows.append({"what": f"TensorLy parafac ({backend})", "rank": r, "note": missing})
            continue
        with tl.backend_context(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = w.clone() if backend == "pytorch" else w.numpy()      # the layer's own float32, as a user would
            t0 = time.perf_counter()
            cp = parafac(tl.tensor(t), r, n_iter_max=cfg["n_iter"], init="svd", tol=0)
            took = time.perf_counter() - t0
            rec = torch.as_tensor(tl.to_numpy(tl.cp_to_tensor(cp)))
        rows.append({"what": f"TensorLy parafac ({backend}), {cfg['n_iter']} iterations", "rank": r,
                     "seconds": took, "error": _rel(rec, w)})
    cp_ours, why = _ours("cp")
    if cp_ours is None:
        rows.append({"what": "convfactor cp", "rank": r, "note": why})
    else:
        t0 = time.perf_counter()
        f = cp_ours.factorize(w.double(), spec, cp_ours.expand_rank(spec, r))
        took = time.perf_counter() - t0
        rows.append({"what": "convfactor cp", "rank": r, "seconds": took, "error": _rel(cp_ours.reconstruct(f, spec), w)})
    if tl is not None:
        with tl.backend_context("pytorch"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            res = partial_tucker(tl.tensor(w.clone()), rank=[rt, rt], modes=[0, 1], n_iter_max=cfg["n_iter"])
            took = time.perf_counter() - t0
            core, factors = res[0] if isinstance(res[0], (tuple, list)) else res
            rec = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
        rows.append({"what": "TensorLy partial_tucker (pytorch)", "rank": f"{rt},{rt}", "seconds": took,
                     "error": _rel(torch.as_tensor(rec), w)})
    else:
        rows.append({"what": "TensorLy partial_tucker", "rank": f"{rt},{rt}", "note": missing})
    tk, why = _ours("tucker2")
    if tk is None:
        rows.append({"what": "convfactor tucker2", "rank": f"{rt},{rt}", "note": why})
    else:
        t0 = time.perf_counter()
        f = tk.factorize(w.double(), spec, tk.expand_rank(spec, rt))
        took = time.perf_counter() - t0
        rows.append({"what": "convfactor tucker2", "rank": f"{rt},{rt}", "seconds": took,
                     "error": _rel(tk.reconstruct(f, spec), w)})
    t0 = time.perf_counter()
    s = torch.linalg.svdvals(w.reshape(n, -1))
    rows.append({"what": "reference: truncated SVD (channel_svd) of the same kernel", "rank": r,
                 "seconds": time.perf_counter() - t0,
                 "error": (s[r:].pow(2).sum() / s.pow(2).sum()).sqrt().item()})
    return rows


def layer_rows(cfg: dict) -> list[dict]:
    """TensorLy-Torch FactorizedConv vs convfactor's CP as layers: init time, speed-up, output error."""
    from convfactor.compression.api import factorize
    from convfactor.measure.compare import compare_speed
    ch, size = cfg["layer"]
    r = cfg["layer_rank"]
    torch.manual_seed(0)
    conv = nn.Conv2d(ch, ch, 3, padding=1).eval()
    with torch.no_grad():
        conv.weight.copy_(structured_kernel((ch, ch, 3, 3), 4 * r, torch.Generator().manual_seed(1)))
    x = torch.randn(1, ch, size, size)
    with torch.no_grad():
        ref = conv(x)
    rows = []
    candidates = []
    if cfg is not QUICK:
        from convfactor.measure.latency import burn_in
        burn_in(3.0)
    try:
        import tltorch

        def make_tltorch():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return tltorch.FactorizedConv.from_conv(conv, rank=r, factorization="cp", implementation="factorized")
        candidates.append(("TensorLy-Torch FactorizedConv.from_conv (CP, 'factorized')", make_tltorch))
    except ImportError as exc:
        rows.append({"what": "TensorLy-Torch FactorizedConv", "rank": r, "note": f"n/a (tltorch not installed: {exc})"})
    if _ours("cp")[0] is not None:
        candidates.append(("convfactor factorize(conv, 'cp')", lambda: factorize(conv, "cp", rank=r)))
    else:
        rows.append({"what": "convfactor cp", "rank": r, "note": _ours("cp")[1]})
    for label, make in candidates:
        t0 = time.perf_counter()
        layer = make().eval()
        init = time.perf_counter() - t0
        with torch.no_grad():
            err = _rel(layer(x), ref)
            res = compare_speed(conv, layer, x, repeats=cfg["repeats"], rounds=3)
        rows.append({"what": label, "rank": r, "seconds": init, "error": err, "speedup": res.speedup, "noisy": res.noisy,
                     "forms": f"{res.original_best} / {res.compressed_best}",
                     "params": sum(p.numel() for p in layer.parameters())})
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def run(quick: bool = False) -> str:
    from convfactor.measure.latency import environment
    cfg = QUICK if quick else FULL
    env = environment(torch.get_num_threads())
    krows = kernel_rows(cfg)
    lrows = layer_rows(cfg)
    n, c, kh, kw = cfg["kernel"]
    ch, size = cfg["layer"]
    lines = [f"## {TITLE}", "",
             f"{env['threads']} threads, {env['cpu']}, torch {env['torch']}. Same process, same inputs.", "",
             f"### Decomposing one {n}x{c}x{kh}x{kw} kernel at equal rank", "",
             "| implementation | rank | seconds | relative kernel error |", "|---|---|---|---|"]
    for row in krows:
        if "note" in row:
            lines.append(f"| {row['what']} | {row['rank']} | {row['note']} | |")
        else:
            lines.append(f"| {row['what']} | {row['rank']} | {row['seconds']:.3f} | {row['error']:.4f} |")
    lines += ["", f"The kernel is synthetic with a decaying spectrum (a sum of {4 * cfg['cp_rank']} seeded random "
              "rank-1 terms with weights 0.97^i, plus 1% noise); no trained weights ship offline. Equal rank, "
              "equal data, one process.", "",
              f"### As a layer: {ch}->{ch} 3x3 @{size}x{size}, batch 1, CP rank {cfg['layer_rank']}", "",
              "| implementation | init seconds | speed-up vs dense (fastest forms: dense / factorized) | "
              "output rel. error | params |", "|---|---|---|---|---|"]
    dense_params = ch * ch * 9 + ch
    for row in lrows:
        if "note" in row:
            lines.append(f"| {row['what']} | {row['note']} | | | |")
        else:
            lines.append(f"| {row['what']} | {row['seconds']:.2f} | {row['speedup']:.2f}x{' †' if row['noisy'] else ''} "
                         f"({row['forms']}) | "
                         f"{row['error']:.4f} | {row['params']} (dense {dense_params}) |")
    if any(row.get("noisy") for row in lrows):
        lines += ["", "† noisy: the IQR of a fastest form exceeded 25% of its median (a busy machine); re-run on a "
                  "quiet machine before quoting."]
    lines.append("")
    return "\n".join(lines)

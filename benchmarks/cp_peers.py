"""CP-ALS (``convfactor.methods.cp``) vs TensorLy ``parafac``, side by side in one run.

Each fit runs in a fresh spawned process (so peak RSS, read with ``resource.getrusage``, is that
fit's own: torch's CPU allocations are invisible to tracemalloc) on the same seeded kernel:
a Gaussian-random 256x256x3x3 kernel and a structured one (a sum of ``R`` random rank-1 terms plus
5% noise), at ranks 64 and 256.  Ours runs with its defaults (50 sweeps with line search, float64
inside but for the float32 GEMMs of the early sweeps) and with ``n_iter=100``; TensorLy runs with
the torch backend, its default ``init='svd'`` and 100 iterations, on the float32 kernel a conv
layer holds.  Errors are ``||W - W_hat|| / ||W||`` computed in float64 by this module.
"""
from __future__ import annotations

import multiprocessing as mp
import resource
import time
import warnings
from dataclasses import dataclass

import torch

from convfactor.measure.latency import environment
from convfactor.methods import registry
from convfactor.methods.cp import cp_als, cp_reconstruct
from convfactor.spec.convspec import ConvSpec
from convfactor.utils import torch_threads

from .markdown import heading, table
from .section import Section

TITLE = "CP-ALS vs TensorLy parafac"

#: our configurations: the defaults, and twice the sweeps
OURS = [("defaults", {}), ("n_iter=100", {"n_iter": 100})]
FULL = dict(size=256, ranks=(64, 256), kinds=("gaussian", "structured"), tl_iter=100, threads=2, spawn=True,
            ours=OURS)
#: quick: in-process (seconds; peak RSS then is this process's, not the fit's)
QUICK = dict(size=32, ranks=(8,), kinds=("gaussian",), tl_iter=5, threads=1, spawn=False, ours=OURS[:1])


def make_kernel(kind: str, size: int, rank: int, seed: int = 0) -> torch.Tensor:
    """``(size, size, 3, 3)`` float32: Gaussian, or ``rank`` random rank-1 terms + 5% noise."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(size, size, 3, 3, generator=g)
    factors = [torch.randn(1, d, rank, generator=g, dtype=torch.float64) for d in (size, size, 3, 3)]
    w = cp_reconstruct(factors)[0]
    noise = torch.randn(w.shape, generator=g, dtype=torch.float64)
    return (w + 0.05 * w.norm() / noise.norm() * noise).float()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def _fit_tensorly(w: torch.Tensor, job: dict) -> tuple[torch.Tensor, float, float]:
    """TensorLy ``parafac`` (torch backend) of ``w``: (reconstruction in float64, seconds, RSS before in MB)."""
    import tensorly as tl
    from tensorly.decomposition import parafac
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "n_eigenvecs larger than min(matrix.shape)"
        parafac(torch.randn(4, 4, 3, 3), 2, n_iter_max=1)          # warm the code path
        before = _rss_mb()
        t0 = time.perf_counter()
        cp = parafac(w, job["rank"], n_iter_max=job["tl_iter"])
        seconds = time.perf_counter() - t0
        return tl.cp_to_tensor(cp).double(), seconds, before


def _fit_ours(exact: torch.Tensor, job: dict) -> tuple[torch.Tensor, float, float]:
    """convfactor's ``cp`` (configured with ``job["options"]``) of the float64 kernel: as :func:`_fit_tensorly`."""
    method = registry.get("cp", **job.get("options", {}))
    spec = ConvSpec.from_module(torch.nn.Conv2d(job["size"], job["size"], 3, bias=False))
    cp_als(torch.randn(1, 4, 4, 3, 3, dtype=torch.float64), 2, n_iter=2)   # warm the code path
    before = _rss_mb()
    t0 = time.perf_counter()
    factors = method.factorize(exact, spec, (job["rank"],))
    seconds = time.perf_counter() - t0
    return method.reconstruct(factors, spec), seconds, before


def _fit(job: dict) -> dict:
    """Runs in a fresh process (or in this one, quick): one fit, its wall time, error and peak RSS."""
    with torch_threads(job["threads"]):
        w = make_kernel(job["kind"], job["size"], job["rank"])
        exact = w.double()
        tensorly = job["who"] == "tensorly"
        approx, seconds, before = _fit_tensorly(w, job) if tensorly else _fit_ours(exact, job)
    err = float((approx - exact).norm() / exact.norm())
    return {"seconds": seconds, "error": err, "rss_before_mb": before, "rss_peak_mb": _rss_mb(),
            "iters": job["tl_iter"] if tensorly else None}


def run_fit(job: dict, spawn: bool = True) -> dict:
    """:func:`_fit` in a fresh spawned process (``spawn``) or in this one."""
    if not spawn:
        return _fit(job)
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_fit, (job,))


@dataclass
class Case:
    """One kernel at one rank: our fits (label -> result of :func:`_fit`) and TensorLy's."""
    kind: str
    shape: str
    rank: int
    ours: dict[str, dict]
    theirs: dict


@dataclass
class Results:
    quick: bool
    tl_iter: int
    env: dict
    cases: list[Case]


def measure(quick: bool = False) -> Results:
    cfg = QUICK if quick else FULL
    cases = []
    for kind in cfg["kinds"]:
        for rank in cfg["ranks"]:
            base = dict(kind=kind, size=cfg["size"], rank=rank, threads=cfg["threads"], tl_iter=cfg["tl_iter"])
            ours = {label: run_fit({**base, "who": "ours", "options": options}, cfg["spawn"])
                    for label, options in cfg["ours"]}
            theirs = run_fit({**base, "who": "tensorly"}, cfg["spawn"])
            cases.append(Case(kind, f"{cfg['size']}x{cfg['size']}x3x3", rank, ours, theirs))
    env = environment(cfg["threads"], kernel_dtype="float32 (ours: float64 inside)", batch="n/a")
    return Results(quick, cfg["tl_iter"], env, cases)


def _fit_rows(results: Results) -> list[list]:
    rows = []
    for c in results.cases:
        fits = [(f"convfactor cp ({label})", r) for label, r in c.ours.items()]
        fits.append((f"TensorLy parafac ({results.tl_iter} it)", c.theirs))
        rows += [[f"{c.kind} {c.shape}", c.rank, who, f"{r['seconds']:.3f}", f"{r['error']:.5f}",
                  f"{r['rss_peak_mb']:.0f}", f"{r['rss_peak_mb'] - r['rss_before_mb']:.0f}"] for who, r in fits]
    return rows


def _summary_rows(results: Results) -> list[list]:
    rows = []
    for c in results.cases:
        for label, r in c.ours.items():
            speed = c.theirs["seconds"] / max(r["seconds"], 1e-9)
            rows.append([c.kind, c.rank, label, f"{speed:.1f}x", f"{r['error'] / max(c.theirs['error'], 1e-300):.4f}",
                         _yes(r["error"] <= c.theirs["error"]), _yes(speed >= 25), _yes(r["rss_peak_mb"] < 1024)])
    return rows


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def render(results: Results) -> str:
    out = [*heading(TITLE),
           "Same seeded kernel for both; each fit in a fresh spawned process. Peak RSS is the process's "
           "high-water mark (includes the interpreter and torch, ~the 'before' figure); 'fit +MB' is the growth "
           "during the fit. Errors are relative Frobenius errors of the kernel, in float64.", "",
           *table(["kernel", "rank", "method", "time (s)", "rel. error", "peak RSS (MB)", "fit +MB"],
                  _fit_rows(results)), "",
           *table(["kernel", "rank", "ours", "speed-up vs TensorLy", "error ratio (ours / theirs)", "error <= theirs",
                   ">= 25x", "peak < 1 GB"], _summary_rows(results)), "",
           f"Environment: {results.env}", ""]
    if results.quick:
        out.insert(2, "_Quick smoke configuration (small kernel, TensorLy 5 iterations, in-process so RSS is "
                      "not per fit): not the reported figures._\n")
    return "\n".join(out)


SECTION = Section("cp_peers", TITLE, measure, render)

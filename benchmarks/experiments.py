"""The seeds' headline experiments, in miniature, on this machine.

Each experiment is a :class:`~benchmarks.section.Section` whose Markdown is a ``###`` subsection, and
can be run alone with ``python -m benchmarks --experiment NAME``:

* ``lebedev_cp`` -- Lebedev et al., "Speeding-up Convolutional Neural Networks Using Fine-tuned
  CP-Decomposition" (ICLR 2015): CP-decomposed conv layers at 4x and 8x fewer MACs, measured
  speed-up on this CPU against the dense layer's fastest form.
* ``blog_spatial_svd`` -- the blog's experiment: the 6-conv network (``blognet``), its 5x5 layers 1
  and 3 decomposed at ranks 10 and 20 with Tai et al.'s spatial SVD ("Convolutional neural networks
  with low-rank regularization", ICLR 2016), then 5 epochs of fine-tuning; accuracy before/after,
  weight reductions (the blog: x1.48 and x16) and forward speed-up (the blog: +20%), on scikit-learn's
  handwritten digits (ships offline).

* ``sedky_rrdbnet`` and ``li_operating_points`` -- the super-resolution seeds (Sedky & Hosmer's
  RRDBNet Table 1 / Fig. 3, Li et al.'s Table 2), on SR networks trained here: see
  :mod:`benchmarks.sr_seeds`.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from convfactor import models
from convfactor.compression.api import compress
from convfactor.measure.compare import SpeedComparison, compare_speed
from convfactor.measure.latency import burn_in
from convfactor.methods import registry
from convfactor.spec.convspec import ConvSpec

from .markdown import NOISY_NOTE, heading, noisy_mark, table
from .section import Section
from .sr_seeds import LI, SEDKY

TITLE = "The seeds' headline experiments, in miniature"


# ----------------------------------------------------------------------------- Lebedev et al.
LEBEDEV_LAYERS = [  # (label, C, N, kernel, H=W)
    ("AlexNet conv2-like 96->256 5x5 @27x27", 96, 256, 5, 27),
    ("256->256 3x3 @28x28", 256, 256, 3, 28),
    ("64->64 3x3 @56x56", 64, 64, 3, 56),
]
LEBEDEV_QUICK = [("32->32 3x3 @16x16", 32, 32, 3, 16)]


def _cp_row(label: str, conv: nn.Conv2d, x: torch.Tensor, reduction: int, quick: bool) -> dict:
    """The CP chain of ``conv`` at ``reduction``x fewer MACs, timed against the dense layer."""
    cp = registry.get("cp")
    spec = ConvSpec.from_module(conv)
    ranks = cp.resolve_ranks(spec, conv.weight.detach(), macs_ratio=1 / reduction, input_size=tuple(x.shape[2:]))
    # Speed does not depend on the factor values: build the CP chain directly with random
    # factors instead of running CP-ALS (whose accuracy is measured in the peers section).
    layer = cp.build(spec, ranks, None, dtype=torch.float32)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    res = compare_speed(conv, layer.eval(), x, repeats=3 if quick else 15, rounds=3)
    return {"layer": label, "target": reduction, "ranks": ranks, "macs": res.macs_reduction,
            "speedup": res.speedup, "eff": res.efficiency, "forms": f"{res.original_best} / {res.compressed_best}",
            "same": res.same_form.get("contiguous"), "noisy": res.noisy}


def measure_lebedev(quick: bool = False) -> list[dict]:
    """CP layers at 4x and 8x MAC reduction: rank, measured speed-up, efficiency (one dict per row)."""
    if not quick:
        burn_in(3.0)
    rows = []
    for label, c, n, k, hw in (LEBEDEV_QUICK if quick else LEBEDEV_LAYERS):
        torch.manual_seed(0)
        conv = nn.Conv2d(c, n, k, padding=k // 2).eval()
        x = torch.randn(1, c, hw, hw)
        rows += [_cp_row(label, conv, x, reduction, quick) for reduction in (4, 8)]
    return rows


def render_lebedev(rows: list[dict]) -> str:
    lines = [f"### {LEBEDEV.title}", "",
             "Lebedev et al. report, on a CPU, a 4x speed-up of AlexNet's second conv layer (at +1% top-5 "
             "error) and 8.5x for a whole character-classification CNN. Here: one layer at a time, batch 1, "
             "float32, CP chain (1x1, depthwise kx1, depthwise 1xk, 1x1) with random factors (speed does not "
             "depend on their values), against the dense layer's fastest memory format, same process.", "",
             *table(["layer", "target MAC reduction", "CP rank", "actual MAC reduction", "measured speed-up",
                     "efficiency", "fastest forms (dense / CP)", "speed-up, both NCHW"],
                    ([r["layer"], f"{r['target']}x", ",".join(map(str, r["ranks"])), f"{r['macs']:.2f}x",
                      f"{r['speedup']:.2f}x{noisy_mark(r['noisy'])}", f"{r['eff']:.2f}", r["forms"],
                      f"{r['same']:.2f}x" if r["same"] else "-"] for r in rows))]
    if any(r["noisy"] for r in rows):
        lines += ["", NOISY_NOTE]
    lines += ["", f"Median efficiency (speed-up / MAC reduction): "
              f"{statistics.median(r['eff'] for r in rows):.2f} at 4x-8x fewer MACs.", ""]
    return "\n".join(lines)


LEBEDEV = Section("lebedev_cp", "Lebedev et al. (2015): CP-decomposed layers at 4x and 8x fewer MACs, on this CPU",
                  measure_lebedev, render_lebedev)


# ----------------------------------------------------------------------------- the blog
def digits_data(size: int = 8, seed: int = 0, train_fraction: float = 0.8):
    """scikit-learn's 8x8 digits as ``(B, 3, size, size)`` tensors (grey replicated to 3 channels so the
    first layer keeps the blog's 3->192 shape), seeded 80/20 train/test split."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0           # (1797, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(train_fraction * len(y))
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


def train_epochs(model: nn.Module, data, epochs: int, lr: float, batch: int = 64, seed: int = 0) -> None:
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    # BatchNorm's running statistics lag a constant-lr Adam: re-estimate them on the final weights
    # (a momentum-0.1 average of the last batches left ResNet-20 at 54% in eval mode, 98% in train mode)
    torch.optim.swa_utils.update_bn([x[i:i + 256] for i in range(0, len(y), 256)], model)
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data, batch: int = 256) -> float:
    x, y = data
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return correct / len(y)


def _weights(module: nn.Module) -> int:
    """Kernel weights only (no biases), as the blog counts them."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


@dataclass
class Blog:
    """The blog's experiment: accuracies, weights per decomposed layer, speed per batch size."""
    n_train: int
    n_test: int
    epochs: tuple[int, int]                   # from scratch, fine-tuning
    train_s: float
    accuracy: tuple[float, float, float]      # original, decomposed, fine-tuned
    layers: list[tuple[str, int, str, int, int]]   # (name, rank, the blog's reduction, weights before, after)
    weights: tuple[int, int]                  # whole network, before and after
    speeds: dict[int, SpeedComparison]        # batch -> comparison


#: the blog's two decomposed layers: (index among the convs, spatial SVD rank, the blog's weight reduction)
BLOG_LAYERS = ((0, 10, "x1.48"), (2, 20, "x16"))


def measure_blog(quick: bool = False) -> Blog | str:
    """The blog's network trained on the digits, layers 1 and 3 by spatial SVD, fine-tuned; or why not run."""
    try:
        train, test = digits_data()
    except ImportError as exc:
        return f"Not run: scikit-learn is needed for the digits data ({exc}); `pip install convfactor[bench]`."
    if quick:
        train, test = (train[0][:64], train[1][:64]), (test[0][:32], test[1][:32])
    epochs0, epochs_ft = (1, 1) if quick else (6, 5)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = models.get("blognet", num_classes=10)
    train_epochs(model, train, epochs0, lr=1e-3)
    acc0 = accuracy(model, test)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    rules = [{"op_names": [convs[i]], "method": "spatial_svd", "rank": rank} for i, rank, _ in BLOG_LAYERS]
    compressed, _ = compress(model, rules, train[0][:8])
    acc_decomposed = accuracy(compressed, test)
    train_epochs(compressed, train, epochs_ft, lr=1e-4, seed=1)
    accs = (acc0, acc_decomposed, accuracy(compressed, test))
    train_s = time.perf_counter() - t0
    layers = [(convs[i], rank, blog, _weights(model.get_submodule(convs[i])),
               _weights(compressed.get_submodule(convs[i]))) for i, rank, blog in BLOG_LAYERS]
    speeds = {b: compare_speed(model, compressed, torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(2)),
                               repeats=3 if quick else 15, rounds=3) for b in ((1,) if quick else (1, 32))}
    return Blog(len(train[1]), len(test[1]), (epochs0, epochs_ft), train_s, accs, layers,
                (_weights(model), _weights(compressed)), speeds)


def render_blog(blog: Blog | str) -> str:
    head = [f"### {BLOG.title}", ""]
    if isinstance(blog, str):
        return "\n".join(head + [blog, ""])
    (epochs0, epochs_ft), (acc0, acc_decomposed, acc_ft) = blog.epochs, blog.accuracy
    lines = head + [f"Data: scikit-learn's handwritten digits (1797 8x8 images at their native size, grey "
                    f"replicated to 3 channels), seeded 80/20 split: {blog.n_train} train / {blog.n_test} test. The "
                    f"network is trained from scratch for {epochs0} epochs (Adam, lr 1e-3) before decomposition; "
                    f"fine-tuning: {epochs_ft} epochs (Adam, lr 1e-4). Training and fine-tuning took "
                    f"{blog.train_s:.0f} s.", "",
                    *table(["", "test accuracy"], [["original", f"{acc0:.4f}"],
                                                   ["decomposed, before fine-tuning", f"{acc_decomposed:.4f}"],
                                                   [f"after {epochs_ft} epochs of fine-tuning", f"{acc_ft:.4f}"]]), ""]
    before, after = blog.weights
    lines += table(["layer", "rank", "weights before", "weights after", "reduction (the blog)"],
                   [*([name, rank, w0, w1, f"x{w0 / w1:.2f} ({ref})"] for name, rank, ref, w0, w1 in blog.layers),
                    ["whole network", "", before, after, f"x{before / after:.2f}"]])
    lines += [""] + table(["forward at 3x32x32", "MAC reduction", "measured speed-up (the blog: +20%)", "efficiency",
                           "fastest forms (original / decomposed)"],
                          ([f"batch {b}", f"x{s.macs_reduction:.2f}",
                            f"{s.speedup:.2f}x ({(s.speedup - 1) * 100:+.0f}%){noisy_mark(s.noisy)}",
                            f"{s.efficiency:.2f}", f"{s.original_best} / {s.compressed_best}"]
                           for b, s in blog.speeds.items()))
    lines.append("")
    return "\n".join(lines)


BLOG = Section("blog_spatial_svd", "The blog: 6-conv network, 5x5 layers 1 and 3 by spatial SVD (Tai et al.) at ranks "
               "10 and 20, then 5 epochs of fine-tuning", measure_blog, render_blog)


# ----------------------------------------------------------------------------- the section
#: name -> the experiment, a :class:`Section` whose Markdown is a ``###`` subsection
EXPERIMENTS = {e.name: e for e in (LEBEDEV, BLOG, SEDKY, LI)}
NAMES = list(EXPERIMENTS)


def run_one(name: str, quick: bool = False) -> str:
    """One experiment's Markdown (a ``###`` subsection)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(NAMES)}")
    return EXPERIMENTS[name].run(quick)


def measure(quick: bool = False) -> dict[str, tuple[object, float]]:
    """name -> (the experiment's data, seconds it took)."""
    out = {}
    for name, experiment in EXPERIMENTS.items():
        t0 = time.perf_counter()
        out[name] = (experiment.measure(quick), time.perf_counter() - t0)
    return out


def render(results: dict[str, tuple[object, float]]) -> str:
    parts = [*heading(TITLE),
             "Each subsection is produced by `python -m benchmarks --experiment NAME` (names: "
             + ", ".join(f"`{n}`" for n in NAMES) + ").", ""]
    for name, (data, seconds) in results.items():
        parts.append(EXPERIMENTS[name].render(data))
        parts.append(f"_({name}: {seconds:.1f} s)_\n")
    return "\n".join(parts)


SECTION = Section("experiments", TITLE, measure, render)

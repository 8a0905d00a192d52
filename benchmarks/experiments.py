"""The seeds' headline experiments, in miniature, on this machine.

Each experiment is one function ``(quick) -> Markdown`` (a ``###`` subsection) and can be run alone
with ``convfactor bench --experiment NAME``:

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
  :mod:`convfactor.bench.sr_seeds`.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .sr_seeds import li_operating_points, sedky_rrdbnet

TITLE = "The seeds' headline experiments, in miniature"


def _method(name: str):
    from convfactor.methods import registry
    try:
        return registry.get(name), None
    except Exception as exc:  # noqa: BLE001 - provided by another issue; may be absent in this version
        return None, f"{exc}"


# ----------------------------------------------------------------------------- Lebedev et al.
LEBEDEV_LAYERS = [  # (label, C, N, kernel, H=W)
    ("AlexNet conv2-like 96->256 5x5 @27x27", 96, 256, 5, 27),
    ("256->256 3x3 @28x28", 256, 256, 3, 28),
    ("64->64 3x3 @56x56", 64, 64, 3, 56),
]
LEBEDEV_QUICK = [("32->32 3x3 @16x16", 32, 32, 3, 16)]


def lebedev_cp(quick: bool = False) -> str:
    """CP layers at 4x and 8x MAC reduction: rank, measured speed-up, efficiency."""
    from convfactor.spec.convspec import ConvSpec
    from convfactor.measure.compare import compare_speed
    head = ["### Lebedev et al. (2015): CP-decomposed layers at 4x and 8x fewer MACs, on this CPU", ""]
    cp, why = _method("cp")
    if cp is None:
        return "\n".join(head + [f"Not run: the `cp` method is not available in this version ({why}).", ""])
    rows = []
    if not quick:
        from convfactor.measure.latency import burn_in
        burn_in(3.0)
    for label, c, n, k, hw in (LEBEDEV_QUICK if quick else LEBEDEV_LAYERS):
        torch.manual_seed(0)
        conv = nn.Conv2d(c, n, k, padding=k // 2).eval()
        spec = ConvSpec.from_module(conv)
        x = torch.randn(1, c, hw, hw)
        for reduction in (4, 8):
            ranks = cp.resolve_ranks(spec, conv.weight.detach(), macs_ratio=1 / reduction, input_size=(hw, hw))
            # Speed does not depend on the factor values: build the CP chain directly with random
            # factors instead of running CP-ALS (whose accuracy is measured in the peers section).
            layer = cp.build(spec, ranks, None, dtype=torch.float32)
            with torch.no_grad():
                for p in layer.parameters():
                    p.normal_(0, 0.1)
            res = compare_speed(conv, layer.eval(), x, repeats=3 if quick else 15, rounds=3)
            rows.append({"layer": label, "target": reduction, "ranks": ranks, "macs": res.macs_reduction,
                         "speedup": res.speedup, "eff": res.efficiency,
                         "forms": f"{res.original_best} / {res.compressed_best}",
                         "same": res.same_form.get("contiguous"), "noisy": res.noisy})
    lines = head + ["Lebedev et al. report, on a CPU, a 4x speed-up of AlexNet's second conv layer (at +1% top-5 "
                    "error) and 8.5x for a whole character-classification CNN. Here: one layer at a time, batch 1, "
                    "float32, CP chain (1x1, depthwise kx1, depthwise 1xk, 1x1) with random factors (speed does not "
                    "depend on their values), against the dense layer's fastest memory format, same process.", "",
                    "| layer | target MAC reduction | CP rank | actual MAC reduction | measured speed-up | efficiency "
                    "| fastest forms (dense / CP) | speed-up, both NCHW |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = f"{r['same']:.2f}x" if r["same"] else "-"
        lines.append(f"| {r['layer']} | {r['target']}x | {','.join(map(str, r['ranks']))} | {r['macs']:.2f}x | "
                     f"{r['speedup']:.2f}x{' †' if r['noisy'] else ''} | {r['eff']:.2f} | {r['forms']} | {same} |")
    if any(r["noisy"] for r in rows):
        lines += ["", "† noisy: the IQR of a fastest form exceeded 25% of its median (a busy machine); re-run on a "
                  "quiet machine before quoting."]
    lines += ["", f"Median efficiency (speed-up / MAC reduction): "
              f"{statistics.median(r['eff'] for r in rows):.2f} at 4x-8x fewer MACs.", ""]
    return "\n".join(lines)


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


def blog_spatial_svd(quick: bool = False) -> str:
    from convfactor import models
    from convfactor.compression.api import compress
    from convfactor.measure.compare import compare_speed
    head = ["### The blog: 6-conv network, 5x5 layers 1 and 3 by spatial SVD (Tai et al.) at ranks 10 and 20, "
            "then 5 epochs of fine-tuning", ""]
    method, why = _method("spatial_svd")
    if method is None:
        return "\n".join(head + [f"Not run: the `spatial_svd` method is not available in this version ({why}).", ""])
    try:
        train, test = digits_data()
    except ImportError as exc:
        return "\n".join(head + [f"Not run: scikit-learn is needed for the digits data ({exc}); "
                                 "`pip install convfactor[bench]`.", ""])
    if quick:
        train, test = (train[0][:64], train[1][:64]), (test[0][:32], test[1][:32])
    epochs0, epochs_ft = (1, 1) if quick else (6, 5)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = models.get("blognet", num_classes=10)
    train_epochs(model, train, epochs0, lr=1e-3)
    acc0 = accuracy(model, test)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    first, third = convs[0], convs[2]
    rules = [{"op_names": [first], "method": "spatial_svd", "rank": 10},
             {"op_names": [third], "method": "spatial_svd", "rank": 20}]
    compressed, report = compress(model, rules, train[0][:8])
    acc_decomposed = accuracy(compressed, test)
    train_epochs(compressed, train, epochs_ft, lr=1e-4, seed=1)
    acc_ft = accuracy(compressed, test)
    train_s = time.perf_counter() - t0
    reductions = {}
    for name in (first, third):
        reductions[name] = _weights(model.get_submodule(name)) / _weights(compressed.get_submodule(name))
    speeds = {}
    for b in ((1,) if quick else (1, 32)):
        x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        speeds[b] = compare_speed(model, compressed, x, repeats=3 if quick else 15, rounds=3)
    total_w = _weights(model) / _weights(compressed)
    lines = head + [f"Data: scikit-learn's handwritten digits (1797 8x8 images at their native size, grey "
                    f"replicated to 3 channels), seeded 80/20 split: {len(train[1])} train / {len(test[1])} test. The network is "
                    f"trained from scratch for {epochs0} epochs (Adam, lr 1e-3) before decomposition; fine-tuning: "
                    f"{epochs_ft} epochs (Adam, lr 1e-4). Training and fine-tuning took {train_s:.0f} s.", "",
                    "| | test accuracy |", "|---|---|",
                    f"| original | {acc0:.4f} |", f"| decomposed, before fine-tuning | {acc_decomposed:.4f} |",
                    f"| after {epochs_ft} epochs of fine-tuning | {acc_ft:.4f} |", "",
                    "| layer | rank | weights before | weights after | reduction (the blog) |", "|---|---|---|---|---|"]
    for name, rank, blog in ((first, 10, "x1.48"), (third, 20, "x16")):
        lines.append(f"| {name} | {rank} | {_weights(model.get_submodule(name))} | "
                     f"{_weights(compressed.get_submodule(name))} | x{reductions[name]:.2f} ({blog}) |")
    lines += [f"| whole network | | {_weights(model)} | {_weights(compressed)} | x{total_w:.2f} |", "",
              "| forward at 3x32x32 | MAC reduction | measured speed-up (the blog: +20%) | efficiency | "
              "fastest forms (original / decomposed) |", "|---|---|---|---|---|"]
    for b, res in speeds.items():
        lines.append(f"| batch {b} | x{res.macs_reduction:.2f} | {res.speedup:.2f}x ({(res.speedup - 1) * 100:+.0f}%)"
                     f"{' †' if res.noisy else ''} | "
                     f"{res.efficiency:.2f} | {res.original_best} / {res.compressed_best} |")
    lines.append("")
    return "\n".join(lines)


EXPERIMENTS = {"lebedev_cp": lebedev_cp, "blog_spatial_svd": blog_spatial_svd,
               "sedky_rrdbnet": sedky_rrdbnet, "li_operating_points": li_operating_points}
NAMES = list(EXPERIMENTS)


def run_one(name: str, quick: bool = False) -> str:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(NAMES)}")
    return EXPERIMENTS[name](quick=quick)


def run(quick: bool = False) -> str:
    parts = [f"## {TITLE}", "",
             "Each subsection is produced by `convfactor bench --experiment NAME` (names: "
             + ", ".join(f"`{n}`" for n in NAMES) + ").", ""]
    for name in NAMES:
        t0 = time.perf_counter()
        parts.append(run_one(name, quick=quick))
        parts.append(f"_({name}: {time.perf_counter() - t0:.1f} s)_\n")
    return "\n".join(parts)

"""The super-resolution seeds' experiments, in miniature: SR networks trained here on the built-in
photos, then compressed as the papers did, measured on the held-out photos in the same process.

* :func:`sedky_rrdbnet` -- Sedky & Hosmer: an RRDBNet (ESRGAN's generator), original vs channel SVD
  vs CP on the layers their condition-number marking selects (their Fig. 2); PSNR/SSIM as their
  Table 1 and inference speed as their Fig. 3.
* :func:`li_operating_points` -- Li, Gu, Van Gool, Timofte (ICCV 2019), Table 2: SRResNet at
  Basis-64-14 and Basis-32-32, EDSR-8-128 at Basis-128-27 and Basis-128-40 (per residual block),
  as parameters and PSNR.

Nothing here downloads: every network is trained from scratch by :func:`train_sr` for a few hundred
CPU steps, so its absolute PSNR is far below the papers' (trained for days on DIV2K); what carries
over is the *change* each compression causes on the same network and images.  SRResNet and RRDBNet
get VDSR's global bicubic skip (:class:`BicubicSkip`, Kim et al. 2016) with a zero-initialized
last conv, and EDSR-8-128 :func:`convfactor.models.edsr.bilinear_init`, so that short training
starts from interpolation and beats bicubic.
"""
from __future__ import annotations

import functools
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from convfactor.measure.count import count_params
from convfactor.recipes.pipeline import image_layers

__all__ = ["BicubicSkip", "train_sr", "sedky_rrdbnet", "li_operating_points"]


class BicubicSkip(nn.Module):
    """``y = net(x) + bicubic_x{scale}(x)``: a global residual around an SR network (VDSR).

    ``x: (B, C, h, w) -> (B, C, scale h, scale w)``.  ``zero_last`` zeroes the last conv of ``net``
    so the untrained model is exactly bicubic interpolation.
    """

    def __init__(self, net: nn.Module, scale: int, zero_last: bool = True):
        super().__init__()
        self.net, self.scale = net, scale
        if zero_last:
            last = [m for m in net.modules() if isinstance(m, nn.Conv2d)][-1]
            with torch.no_grad():
                last.weight.zero_()
                if last.bias is not None:
                    last.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)


@functools.lru_cache(maxsize=8)
def training_pairs(scale: int, max_side: int | None = None) -> tuple:
    """``((name, lr, hr), ...)`` of the built-in training photos (bicubic LR, computed once per scale);
    ``max_side`` centre-crops the photos first (quick runs)."""
    from convfactor.data.images import builtin_images
    from convfactor.data.sr import _as_pairs
    from convfactor.train.heldout import _center_crop
    images = [(n, _center_crop(a, max_side)) for n, a in builtin_images("train")]
    return tuple(_as_pairs(images, scale))


def train_sr(model: nn.Module, scale: int, *, steps: int, batch_size: int, patch_size: int, lr: float,
             seed: int = 0, teacher: nn.Module | None = None, desc: str = "training",
             progress: bool = False, max_side: int | None = None) -> float:
    """Train ``model`` in place on random patches of the built-in training photos (L1, Adam, cosine);
    with ``teacher``, plus the L1 to its output (distillation).  Returns the seconds it took."""
    from convfactor.data.sr import SRPatchDataset
    from convfactor.train.finetune import finetune
    data = SRPatchDataset(list(training_pairs(scale, max_side)), scale, patch_size, 100_000, augment=True, seed=seed)
    t0 = time.perf_counter()
    finetune(model, data, steps=steps, batch_size=batch_size, lr=lr, optimizer="adam", schedule="cosine",
             warmup=min(20, steps // 10), min_lr_ratio=0.05, loss="l1", teacher=teacher, seed=seed,
             progress=progress, desc=desc)
    return time.perf_counter() - t0


def _quality(model: nn.Module, scale: int, quick: bool) -> dict:
    from convfactor.train.heldout import heldout_quality
    res = heldout_quality(model.eval(), "sr", scale=scale, max_side=48 if quick else None,
                          limit=2 if quick else None)
    return res["mean"]


# ------------------------------------------------------------------------------------ Sedky & Hosmer
SEDKY_FULL = {"blocks": 2, "feats": 32, "grow": 16, "steps": 300, "batch": 16, "patch": 24, "lr": 5e-4,
              "ft_steps": 60, "speed_side": 64, "macs_ratio": 0.5, "train_side": None}
SEDKY_QUICK = {"blocks": 1, "feats": 8, "grow": 4, "steps": 2, "batch": 2, "patch": 8, "lr": 5e-4,
               "ft_steps": 1, "speed_side": 12, "macs_ratio": 0.5, "train_side": 64}


def sedky_rrdbnet(quick: bool = False) -> str:
    """RRDBNet x4, condition-number marking, then channel SVD and CP at the same MACs on the marked layers."""
    from convfactor import models
    from convfactor.compression.inspect import inspect_model
    from convfactor.measure.compare import compare_speed
    from convfactor.measure.count import count
    from convfactor.rank.planner import plan

    cfg = SEDKY_QUICK if quick else SEDKY_FULL
    head = ["### Sedky & Hosmer: RRDBNet (ESRGAN's generator), original vs SVD vs CP, "
            "condition-number layer marking", ""]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    net = models.get("rrdbnet_x4", num_blocks=cfg["blocks"], feats=cfg["feats"], grow=cfg["grow"])
    model = BicubicSkip(net, 4)
    train_s = train_sr(model, 4, steps=cfg["steps"], batch_size=cfg["batch"], patch_size=cfg["patch"],
                       lr=cfg["lr"], desc="train rrdbnet", max_side=cfg["train_side"])
    model.eval()
    x = torch.rand(1, 3, cfg["speed_side"], cfg["speed_side"], generator=torch.Generator().manual_seed(1))
    keep = image_layers(model)
    facts = [f for f in inspect_model(model, x) if f["name"] not in keep and f.get("kappa") is not None]
    kappas = [f["kappa"] for f in facts]
    ordered = sorted(kappas)                     # the threshold lies between two layers' kappas, so rounding
    mid = len(ordered) // 2                      # cannot move a layer across it: the upper half is marked
    threshold = math.sqrt(ordered[max(0, mid - 1)] * ordered[mid])
    marked = [f["name"] for f in facts if f["kappa"] > threshold]
    rows = {"original": {"model": model}}
    for label, method in (("channel SVD", "channel_svd"), ("CP", "cp")):
        p = plan(model, x, target=f"macs={100 * cfg['macs_ratio']:g}%", criterion="uniform", method=method,
                 kappa_threshold=threshold, exclude=keep)
        compressed, _ = p.apply(model, x)
        chosen = sorted(layer.name for layer in p.layers if layer.method is not None)
        assert set(chosen) <= set(marked), "the kappa marking must bound what the planner factorizes"
        rows[label] = {"model": compressed, "layers": len(chosen)}
    base = _quality(model, 4, quick)
    for label, row in rows.items():
        if label != "original":
            row["before_ft"] = _quality(row["model"], 4, quick)
            train_sr(row["model"], 4, steps=cfg["ft_steps"], batch_size=cfg["batch"], patch_size=cfg["patch"],
                     lr=1e-4, seed=2, teacher=model, desc=f"fine-tune {label}", max_side=cfg["train_side"])
            row["model"].eval()
        row["after_ft"] = _quality(row["model"], 4, quick) if label != "original" else base
        row["params"] = count_params(row["model"])
        row["macs"] = count(row["model"], x)["macs"]
        if label != "original":
            row["speed"] = compare_speed(model, row["model"], x, threads=2, repeats=3 if quick else 15, rounds=3)
    total_s = time.perf_counter() - t0
    o = rows["original"]
    lines = head + [
        f"Network: RRDBNet x4 with {cfg['blocks']} RRDB blocks, {cfg['feats']} features, growth {cfg['grow']} "
        f"(ESRGAN uses 23 / 64 / 32), plus a global bicubic skip; trained here for {cfg['steps']} steps (batch "
        f"{cfg['batch']} of {cfg['patch']}x{cfg['patch']} LR patches, L1, Adam) on the built-in training photos in "
        f"{train_s:.0f} s. Layer marking as in their Fig. 2: the condition number kappa = s_max / s_min of each "
        f"conv's (N, C k k) matrix; layers with kappa above the middle of the ranking ({threshold:.3g}; kappa ranges "
        f"{min(kappas):.3g} to {max(kappas):.3g} over the {len(kappas)} non-image convs) are decomposed: "
        f"{len(marked)} layers, each at {cfg['macs_ratio']:.2g} of its MACs. Both methods get the same layers and "
        f"MACs. Fine-tuning: {cfg['ft_steps']} steps with distillation from the original. Quality: mean over the "
        f"held-out built-in photos, PSNR-Y/SSIM-Y, shave 4. Speed: batch 1, a 3x{cfg['speed_side']}x"
        f"{cfg['speed_side']} LR input, 2 threads, against the original's fastest form in the same process.", "",
        "| model | params | MACs | PSNR-Y / SSIM-Y, no fine-tuning | after fine-tuning | latency (ms) | "
        "measured speed-up |", "|---|---|---|---|---|---|---|",
        f"| bicubic | 0 | - | {base['baseline_psnr_y']:.3f} / {base['baseline_ssim_y']:.4f} | - | - | - |"]
    for label, row in rows.items():
        q = row["after_ft"]
        if label == "original":
            lines.append(f"| original | {row['params']} | {row['macs'] / 1e9:.3f} G | {q['psnr_y']:.3f} / "
                         f"{q['ssim_y']:.4f} | - | (see each row) | 1.00x |")
            continue
        s = row["speed"]
        b = row["before_ft"]
        orig_ms = s.original[s.original_best]["median_ms"]
        comp_ms = s.compressed[s.compressed_best]["median_ms"]
        lines.append(f"| {label} ({row['layers']} of {len(marked)} marked layers) | {row['params']} | {row['macs'] / 1e9:.3f} G | "
                     f"{b['psnr_y']:.3f} / {b['ssim_y']:.4f} | {q['psnr_y']:.3f} / {q['ssim_y']:.4f} | "
                     f"{orig_ms:.1f} -> {comp_ms:.1f} | **{s.speedup:.2f}x**{' †' if s.noisy else ''} |")
    lines += ["", "Sedky & Hosmer report (their Table 1, ESRGAN): PSNR 23.27 for the original, 23.31 with SVD and "
              "22.99 with CP, and SVD/CP only \"slightly\" faster (their Fig. 3). MACs are multiply-accumulates at the "
              f"timed input, not time. Original params: {o['params']}. The whole experiment took {total_s:.0f} s.", ""]
    if any(r.get("speed") is not None and r["speed"].noisy for r in rows.values()):
        lines += ["† noisy: the IQR of a fastest form exceeded 25% of its median; re-run on a quiet machine.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ Li et al.
#: (model, scale, channels C, Table 2 operating points as (label, channels per split p, basis size m),
#:  residual-block conv name patterns, train steps, batch, patch, fine-tuning steps, timed LR side)
LI_FULL = [
    ("srresnet_x4", 4, 64, [("Basis-64-14", 64, 14), ("Basis-32-32", 32, 32)],
     ["net.body.*.body.0", "net.body.*.body.3"], 300, 16, 24, 80, 64),
    ("edsr_8_128_x2", 2, 128, [("Basis-128-27", 128, 27), ("Basis-128-40", 128, 40)],
     ["body.*.body.0", "body.*.body.2"], 300, 8, 32, 80, 96),
]
LI_QUICK = [("srresnet_x4", 4, 64, [("Basis-64-14", 64, 14)], ["net.body.*.body.0", "net.body.*.body.3"],
             2, 2, 8, 1, 12)]
#: Table 2 parameters per residual block (conv weights, thousands): the paper's numbers
LI_TABLE2_K = {"Basis-64-14": 18, "Basis-32-32": 27, "Basis-128-27": 69, "Basis-128-40": 102}


def _li_model(name: str, quick: bool) -> nn.Module:
    from convfactor import models
    from convfactor.models.edsr import bilinear_init
    torch.manual_seed(0)
    if name.startswith("edsr"):
        model = models.get(name)
        bilinear_init(model)
        return model
    return BicubicSkip(models.get(name, n_blocks=2) if quick else models.get(name), 4)


def block_weights(model: nn.Module, patterns) -> int:
    """Mean weights (no biases) per residual block of the layers matching ``patterns`` (two per block):
    a dense conv's kernel, or a basis layer's basis plus coefficients."""
    import fnmatch
    total, layers = 0, 0
    for name, m in model.named_modules():
        if any(fnmatch.fnmatch(name, pat) for pat in patterns):
            total += sum(p.numel() for n, p in m.named_parameters() if not n.endswith("bias"))
            layers += 1
    if not layers:
        raise ValueError(f"no layer matches {patterns}")
    return len(patterns) * total // layers


def li_operating_points(quick: bool = False) -> str:
    """Li et al.'s Table 2 operating points on SRResNet and EDSR-8-128 trained here: params and PSNR."""
    from convfactor.compression.api import compress
    from convfactor.measure.compare import compare_speed

    head = ["### Li et al. (ICCV 2019): Table 2 operating points on SRResNet and EDSR-8-128, params and PSNR", ""]
    lines = head + [
        "Each network is trained here from scratch on the built-in training photos (L1, Adam; steps below), then "
        "every residual-block conv is replaced by a learned filter basis \"Basis-p-m\" (m basis filters of p "
        "channels, s = C/p splits; initialized by the truncated SVD of the splits), fine-tuned with distillation "
        "from the uncompressed network plus the eq. 12 basis regularizer, and measured on the held-out built-in "
        "photos (PSNR-Y/SSIM-Y, shave = scale). Params per block count the two convs' weights without biases, as "
        "Table 2 does. Speed: batch 1, 2 threads, against the original's fastest form in the same process.", "",
        "| model (trained here) | operating point | weights / block (Table 2) | network params (% of original) | "
        "PSNR-Y / SSIM-Y, no fine-tuning | fine-tuned | loss (dB) | measured speed-up |",
        "|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, scale, channels, points, patterns, steps, batch, patch, ft_steps, side in (LI_QUICK if quick else LI_FULL):
        t0 = time.perf_counter()
        model = _li_model(name, quick)
        train_s = train_sr(model, scale, steps=steps, batch_size=batch, patch_size=patch,
                           lr=5e-4 if "srresnet" in name else 4e-4, desc=f"train {name}",
                           max_side=64 if quick else None)
        model.eval()
        base = _quality(model, scale, quick)
        p0 = count_params(model)
        lines.append(f"| {name} | original | {block_weights(model, patterns) / 1000:.0f}k | {p0} (100%) | - | "
                     f"{base['psnr_y']:.3f} / {base['ssim_y']:.4f} | - | 1.00x |")
        x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(1))
        for label, p, m in points:
            rules = [{"op_names": patterns, "method": "basis", "rank": m, "splits": channels // p}]
            small, _ = compress(model, rules, x)
            before = _quality(small, scale, quick)
            train_sr(small, scale, steps=ft_steps, batch_size=batch, patch_size=patch, lr=1e-4, seed=2,
                     teacher=model, desc=f"fine-tune {label}", max_side=64 if quick else None)
            small.eval()
            after = _quality(small, scale, quick)
            s = compare_speed(model, small, x, threads=2, repeats=3 if quick else 12, rounds=3)
            ps = count_params(small)
            lines.append(f"| {name} | {label} | {block_weights(small, patterns) / 1000:.0f}k "
                         f"({LI_TABLE2_K[label]}k) | {ps} ({100 * ps / p0:.1f}%) | "
                         f"{before['psnr_y']:.3f} / {before['ssim_y']:.4f} | "
                         f"{after['psnr_y']:.3f} / {after['ssim_y']:.4f} | **{base['psnr_y'] - after['psnr_y']:.3f}** | "
                         f"{s.speedup:.2f}x{' †' if s.noisy else ''} |")
        notes.append(f"- {name}: trained {steps} steps (batch {batch} of {patch}x{patch} LR patches) in {train_s:.0f} s; "
                     f"bicubic {base['baseline_psnr_y']:.3f} / {base['baseline_ssim_y']:.4f}; each operating point "
                     f"fine-tuned {ft_steps} steps; timed at 3x{side}x{side}; these rows took "
                     f"{time.perf_counter() - t0:.0f} s.")
    lines += [""] + notes + ["",
              "Li et al. keep EDSR within 0.09 dB at 13.9% of the parameters after 300 GPU epochs on DIV2K and "
              "report no speed; their absolute PSNRs (Set5/Set14/B100/Urban100) are not comparable with these "
              "briefly trained networks on other images. † noisy timing (IQR > 25% of the median).", ""]
    return "\n".join(lines)


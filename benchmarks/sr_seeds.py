"""The super-resolution seeds' experiments, in miniature: SR networks trained here on the built-in
photos, then compressed as the papers did, measured on the held-out photos in the same process.

* :data:`SEDKY` (``sedky_rrdbnet``) -- Sedky & Hosmer: an RRDBNet (ESRGAN's generator), original vs channel SVD
  vs CP on the layers their condition-number marking selects (their Fig. 2); PSNR/SSIM as their
  Table 1 and inference speed as their Fig. 3.
* :data:`LI` (``li_operating_points``) -- Li, Gu, Van Gool, Timofte (ICCV 2019), Table 2: SRResNet at
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

import fnmatch
import functools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from convfactor import models
from convfactor.compression.api import compress
from convfactor.compression.inspect import inspect_model
from convfactor.data.images import builtin_images
from convfactor.data.sr import SRPatchDataset, bicubic_downscale, mod_crop
from convfactor.measure.compare import SpeedComparison, compare_speed
from convfactor.measure.count import count, count_params
from convfactor.measure.quality import evaluate_sr
from convfactor.models.edsr import bilinear_init
from convfactor.rank import RankConfig, plan
from convfactor.recipes.pipeline import image_layers
from convfactor.train.finetune import FinetuneConfig, OptimizerConfig, finetune

from .markdown import fastest_ms, noisy_mark, table
from .section import Section

__all__ = ["BicubicSkip", "train_sr", "SEDKY", "LI"]


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
    pairs = []
    for name, img in builtin_images("train", max_side=max_side):
        hr = mod_crop(img, scale)
        pairs.append((name, bicubic_downscale(hr, scale), hr))
    return tuple(pairs)


def train_sr(model: nn.Module, scale: int, *, steps: int, batch_size: int, patch_size: int, lr: float,
             seed: int = 0, teacher: nn.Module | None = None, desc: str = "training",
             progress: bool = False, max_side: int | None = None) -> float:
    """Train ``model`` in place on random patches of the built-in training photos (L1, Adam, cosine);
    with ``teacher``, plus the L1 to its output (distillation).  Returns the seconds it took."""
    data = SRPatchDataset(list(training_pairs(scale, max_side)), scale, patch_size, 100_000, augment=True, seed=seed)
    config = FinetuneConfig(steps=steps, batch_size=batch_size, loss="l1", seed=seed, progress=progress, desc=desc,
                            optimizer=OptimizerConfig(lr=lr, schedule="cosine", warmup=min(20, steps // 10),
                                                      min_lr_ratio=0.05))
    t0 = time.perf_counter()
    finetune(model, data, config, teacher=teacher)
    return time.perf_counter() - t0


def _quality(model: nn.Module, scale: int, quick: bool) -> dict:
    """Mean PSNR-Y/SSIM-Y (shave = scale) of ``model`` and of bicubic on the held-out built-in photos
    (quick: two centre crops of 48 px): ``{"psnr", "ssim", "bicubic_psnr", "bicubic_ssim"}``."""
    images = builtin_images("test", max_side=48 if quick else None, limit=2 if quick else None)
    res = evaluate_sr(model.eval(), images, scale)
    return {k: res[k] for k in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")}


def _psnr_ssim(q: dict) -> str:
    return f"{q['psnr']:.3f} / {q['ssim']:.4f}"


# ------------------------------------------------------------------------------------ Sedky & Hosmer
SEDKY_FULL = {"blocks": 2, "feats": 32, "grow": 16, "steps": 300, "batch": 16, "patch": 24, "lr": 5e-4,
              "ft_steps": 60, "speed_side": 64, "macs_ratio": 0.5, "train_side": None}
SEDKY_QUICK = {"blocks": 1, "feats": 8, "grow": 4, "steps": 2, "batch": 2, "patch": 8, "lr": 5e-4,
               "ft_steps": 1, "speed_side": 12, "macs_ratio": 0.5, "train_side": 64}


@dataclass
class SedkyRow:
    """One model of the comparison: the original, or a method on the marked layers (fine-tuned)."""
    label: str
    params: int
    macs: int
    after_ft: dict                          # :func:`_quality` (the original: as trained)
    before_ft: dict | None = None
    layers: int = 0                         # layers the planner factorized
    speed: SpeedComparison | None = None


@dataclass
class Sedky:
    cfg: dict
    train_s: float
    kappas: list[float]                     # of the non-image convs
    threshold: float
    marked: list[str]
    base: dict                              # the original's :func:`_quality` (also bicubic's)
    rows: list[SedkyRow] = field(default_factory=list)
    total_s: float = 0.0


def _train_rrdbnet(cfg: dict) -> tuple[nn.Module, float]:
    torch.manual_seed(0)
    net = models.get("rrdbnet_x4", num_blocks=cfg["blocks"], feats=cfg["feats"], grow=cfg["grow"])
    model = BicubicSkip(net, 4)
    train_s = train_sr(model, 4, steps=cfg["steps"], batch_size=cfg["batch"], patch_size=cfg["patch"],
                       lr=cfg["lr"], desc="train rrdbnet", max_side=cfg["train_side"])
    return model.eval(), train_s


def kappa_marking(model: nn.Module, x: torch.Tensor, keep: list[str]) -> tuple[list[float], float, list[str]]:
    """Their Fig. 2: kappa of every non-image conv, the threshold between the two middle kappas, the marked layers."""
    facts = [f for f in inspect_model(model, x) if f["name"] not in keep and f.get("kappa") is not None]
    kappas = [f["kappa"] for f in facts]
    ordered = sorted(kappas)                     # the threshold lies between two layers' kappas, so rounding
    mid = len(ordered) // 2                      # cannot move a layer across it: the upper half is marked
    threshold = math.sqrt(ordered[max(0, mid - 1)] * ordered[mid])
    return kappas, threshold, [f["name"] for f in facts if f["kappa"] > threshold]


def _sedky_method(model: nn.Module, x: torch.Tensor, label: str, method: str, exp: Sedky, keep: list[str],
                  quick: bool) -> SedkyRow:
    """``method`` at the same MACs ratio on the marked layers, fine-tuned with distillation, measured."""
    cfg = exp.cfg
    p = plan(model, x, target={"macs": cfg["macs_ratio"]}, criterion="uniform", method=method,
             config=RankConfig(kappa_threshold=exp.threshold), exclude=keep)
    compressed, _ = p.apply(model, x, allow_unreachable=True)    # a missed request is measured and reported
    chosen = sorted(layer.name for layer in p.layers if layer.method is not None)
    if not set(chosen) <= set(exp.marked):
        raise RuntimeError(f"the planner factorized unmarked layers {sorted(set(chosen) - set(exp.marked))}")
    before = _quality(compressed, 4, quick)
    train_sr(compressed, 4, steps=cfg["ft_steps"], batch_size=cfg["batch"], patch_size=cfg["patch"],
             lr=1e-4, seed=2, teacher=model, desc=f"fine-tune {label}", max_side=cfg["train_side"])
    compressed.eval()
    return SedkyRow(label, count_params(compressed), count(compressed, x)["macs"], _quality(compressed, 4, quick),
                    before, len(chosen),
                    compare_speed(model, compressed, x, threads=2, repeats=3 if quick else 15, rounds=3))


def measure_sedky(quick: bool = False) -> Sedky:
    """RRDBNet x4, condition-number marking, then channel SVD and CP at the same MACs on the marked layers."""
    cfg = SEDKY_QUICK if quick else SEDKY_FULL
    t0 = time.perf_counter()
    model, train_s = _train_rrdbnet(cfg)
    x = torch.rand(1, 3, cfg["speed_side"], cfg["speed_side"], generator=torch.Generator().manual_seed(1))
    keep = image_layers(model)
    kappas, threshold, marked = kappa_marking(model, x, keep)
    exp = Sedky(cfg, train_s, kappas, threshold, marked, _quality(model, 4, quick))
    exp.rows = [SedkyRow("original", count_params(model), count(model, x)["macs"], exp.base)]
    exp.rows += [_sedky_method(model, x, label, method, exp, keep, quick)
                 for label, method in (("channel SVD", "channel_svd"), ("CP", "cp"))]
    exp.total_s = time.perf_counter() - t0
    return exp


def _sedky_cells(row: SedkyRow, marked: int) -> list:
    if row.speed is None:
        return ["original", row.params, f"{row.macs / 1e9:.3f} G", _psnr_ssim(row.after_ft), "-", "(see each row)",
                "1.00x"]
    s = row.speed
    return [f"{row.label} ({row.layers} of {marked} marked layers)", row.params, f"{row.macs / 1e9:.3f} G",
            _psnr_ssim(row.before_ft), _psnr_ssim(row.after_ft),
            f"{fastest_ms(s, 'original'):.1f} -> {fastest_ms(s, 'compressed'):.1f}",
            f"**{s.speedup:.2f}x**{noisy_mark(s.noisy)}"]


def render_sedky(exp: Sedky) -> str:
    cfg, base, kappas = exp.cfg, exp.base, exp.kappas
    lines = [f"### {SEDKY.title}", "",
             f"Network: RRDBNet x4 with {cfg['blocks']} RRDB blocks, {cfg['feats']} features, growth {cfg['grow']} "
             f"(ESRGAN uses 23 / 64 / 32), plus a global bicubic skip; trained here for {cfg['steps']} steps (batch "
             f"{cfg['batch']} of {cfg['patch']}x{cfg['patch']} LR patches, L1, Adam) on the built-in training photos in "
             f"{exp.train_s:.0f} s. Layer marking as in their Fig. 2: the condition number kappa = s_max / s_min of each "
             f"conv's (N, C k k) matrix; layers with kappa above the middle of the ranking ({exp.threshold:.3g}; kappa "
             f"ranges {min(kappas):.3g} to {max(kappas):.3g} over the {len(kappas)} non-image convs) are decomposed: "
             f"{len(exp.marked)} layers, each at {cfg['macs_ratio']:.2g} of its MACs. Both methods get the same layers "
             f"and MACs. Fine-tuning: {cfg['ft_steps']} steps with distillation from the original. Quality: mean over "
             f"the held-out built-in photos, PSNR-Y/SSIM-Y, shave 4. Speed: batch 1, a 3x{cfg['speed_side']}x"
             f"{cfg['speed_side']} LR input, 2 threads, against the original's fastest form in the same process.", "",
             *table(["model", "params", "MACs", "PSNR-Y / SSIM-Y, no fine-tuning", "after fine-tuning", "latency (ms)",
                     "measured speed-up"],
                    [["bicubic", 0, "-", f"{base['bicubic_psnr']:.3f} / {base['bicubic_ssim']:.4f}", "-", "-", "-"],
                     *(_sedky_cells(r, len(exp.marked)) for r in exp.rows)])]
    lines += ["", "Sedky & Hosmer report (their Table 1, ESRGAN): PSNR 23.27 for the original, 23.31 with SVD and "
              "22.99 with CP, and SVD/CP only \"slightly\" faster (their Fig. 3). MACs are multiply-accumulates at the "
              f"timed input, not time. Original params: {exp.rows[0].params}. The whole experiment took "
              f"{exp.total_s:.0f} s.", ""]
    if any(r.speed is not None and r.speed.noisy for r in exp.rows):
        lines += ["† noisy: the IQR of a fastest form exceeded 25% of its median; re-run on a quiet machine.", ""]
    return "\n".join(lines)


SEDKY = Section("sedky_rrdbnet", "Sedky & Hosmer: RRDBNet (ESRGAN's generator), original vs SVD vs CP, "
                "condition-number layer marking", measure_sedky, render_sedky)


# ------------------------------------------------------------------------------------ Li et al.
@dataclass(frozen=True)
class LiCase:
    """A network of Li et al.'s Table 2 and how it is trained and timed here."""
    model: str
    scale: int
    channels: int                           # C
    points: tuple                           # Table 2 operating points: (label, channels per split p, basis size m)
    patterns: tuple                         # its residual-block conv name patterns (two per block)
    steps: int                              # training steps, batch, LR patch side
    batch: int
    patch: int
    ft_steps: int                           # fine-tuning steps per operating point
    side: int                               # timed LR side


LI_FULL = [
    LiCase("srresnet_x4", 4, 64, (("Basis-64-14", 64, 14), ("Basis-32-32", 32, 32)),
           ("net.body.*.body.0", "net.body.*.body.3"), 300, 16, 24, 80, 64),
    LiCase("edsr_8_128_x2", 2, 128, (("Basis-128-27", 128, 27), ("Basis-128-40", 128, 40)),
           ("body.*.body.0", "body.*.body.2"), 300, 8, 32, 80, 96),
]
LI_QUICK = [LiCase("srresnet_x4", 4, 64, (("Basis-64-14", 64, 14),), ("net.body.*.body.0", "net.body.*.body.3"),
                   2, 2, 8, 1, 12)]
#: Table 2 parameters per residual block (conv weights, thousands): the paper's numbers
LI_TABLE2_K = {"Basis-64-14": 18, "Basis-32-32": 27, "Basis-128-27": 69, "Basis-128-40": 102}


def _li_model(name: str, quick: bool) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("edsr"):
        model = models.get(name)
        bilinear_init(model)
        return model
    return BicubicSkip(models.get(name, n_blocks=2) if quick else models.get(name), 4)


def block_weights(model: nn.Module, patterns) -> int:
    """Mean weights (no biases) per residual block of the layers matching ``patterns`` (two per block):
    a dense conv's kernel, or a basis layer's basis plus coefficients."""
    total, layers = 0, 0
    for name, m in model.named_modules():
        if any(fnmatch.fnmatch(name, pat) for pat in patterns):
            total += sum(p.numel() for n, p in m.named_parameters() if not n.endswith("bias"))
            layers += 1
    if not layers:
        raise ValueError(f"no layer matches {patterns}")
    return len(patterns) * total // layers


@dataclass
class LiPoint:
    """One operating point of one network (or the original: ``label == "original"``)."""
    label: str
    block_weights: int
    params: int
    after: dict                             # :func:`_quality` (fine-tuned)
    before: dict | None = None              # before fine-tuning
    speed: SpeedComparison | None = None


@dataclass
class LiNetwork:
    case: LiCase
    train_s: float
    points: list[LiPoint]                   # the original first
    seconds: float = 0.0


def _li_point(model: nn.Module, case: LiCase, point: tuple, x: torch.Tensor, quick: bool) -> LiPoint:
    label, p, m = point
    rules = [{"op_names": list(case.patterns), "method": "basis", "rank": m, "splits": case.channels // p}]
    small, _ = compress(model, rules, x)
    before = _quality(small, case.scale, quick)
    train_sr(small, case.scale, steps=case.ft_steps, batch_size=case.batch, patch_size=case.patch, lr=1e-4, seed=2,
             teacher=model, desc=f"fine-tune {label}", max_side=64 if quick else None)
    small.eval()
    return LiPoint(label, block_weights(small, case.patterns), count_params(small), _quality(small, case.scale, quick),
                   before, compare_speed(model, small, x, threads=2, repeats=3 if quick else 12, rounds=3))


def measure_li_network(case: LiCase, quick: bool) -> LiNetwork:
    t0 = time.perf_counter()
    model = _li_model(case.model, quick)
    train_s = train_sr(model, case.scale, steps=case.steps, batch_size=case.batch, patch_size=case.patch,
                       lr=5e-4 if "srresnet" in case.model else 4e-4, desc=f"train {case.model}",
                       max_side=64 if quick else None)
    model.eval()
    original = LiPoint("original", block_weights(model, case.patterns), count_params(model),
                       _quality(model, case.scale, quick))
    x = torch.rand(1, 3, case.side, case.side, generator=torch.Generator().manual_seed(1))
    points = [original] + [_li_point(model, case, point, x, quick) for point in case.points]
    return LiNetwork(case, train_s, points, time.perf_counter() - t0)


def measure_li(quick: bool = False) -> list[LiNetwork]:
    """Li et al.'s Table 2 operating points on SRResNet and EDSR-8-128 trained here: params and PSNR."""
    return [measure_li_network(case, quick) for case in (LI_QUICK if quick else LI_FULL)]


def _li_cells(net: LiNetwork, pt: LiPoint) -> list:
    orig, name = net.points[0], net.case.model
    if pt.speed is None:
        return [name, "original", f"{pt.block_weights / 1000:.0f}k", f"{pt.params} (100%)", "-", _psnr_ssim(pt.after),
                "-", "1.00x"]
    return [name, pt.label, f"{pt.block_weights / 1000:.0f}k ({LI_TABLE2_K[pt.label]}k)",
            f"{pt.params} ({100 * pt.params / orig.params:.1f}%)", _psnr_ssim(pt.before), _psnr_ssim(pt.after),
            f"**{orig.after['psnr'] - pt.after['psnr']:.3f}**", f"{pt.speed.speedup:.2f}x{noisy_mark(pt.speed.noisy)}"]


def _li_note(net: LiNetwork) -> str:
    c, base = net.case, net.points[0].after
    return (f"- {c.model}: trained {c.steps} steps (batch {c.batch} of {c.patch}x{c.patch} LR patches) in "
            f"{net.train_s:.0f} s; bicubic {base['bicubic_psnr']:.3f} / {base['bicubic_ssim']:.4f}; each operating "
            f"point fine-tuned {c.ft_steps} steps; timed at 3x{c.side}x{c.side}; these rows took {net.seconds:.0f} s.")


def render_li(networks: list[LiNetwork]) -> str:
    lines = [f"### {LI.title}", "",
             "Each network is trained here from scratch on the built-in training photos (L1, Adam; steps below), then "
             "every residual-block conv is replaced by a learned filter basis \"Basis-p-m\" (m basis filters of p "
             "channels, s = C/p splits; initialized by the truncated SVD of the splits), fine-tuned with distillation "
             "from the uncompressed network plus the eq. 12 basis regularizer, and measured on the held-out built-in "
             "photos (PSNR-Y/SSIM-Y, shave = scale). Params per block count the two convs' weights without biases, as "
             "Table 2 does. Speed: batch 1, 2 threads, against the original's fastest form in the same process.", "",
             *table(["model (trained here)", "operating point", "weights / block (Table 2)",
                     "network params (% of original)", "PSNR-Y / SSIM-Y, no fine-tuning", "fine-tuned", "loss (dB)",
                     "measured speed-up"], (_li_cells(net, pt) for net in networks for pt in net.points))]
    lines += ["", *map(_li_note, networks), "",
              "Li et al. keep EDSR within 0.09 dB at 13.9% of the parameters after 300 GPU epochs on DIV2K and "
              "report no speed; their absolute PSNRs (Set5/Set14/B100/Urban100) are not comparable with these "
              "briefly trained networks on other images. † noisy timing (IQR > 25% of the median).", ""]
    return "\n".join(lines)


LI = Section("li_operating_points", "Li et al. (ICCV 2019): Table 2 operating points on SRResNet and EDSR-8-128, "
             "params and PSNR", measure_li, render_li)

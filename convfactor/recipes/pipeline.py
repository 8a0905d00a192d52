"""Plan -> compress -> fine-tune with distillation -> measure, for the zoo's image-to-image models.

This is what ``convfactor demo`` and the ``models`` benchmark section run.  Every figure is
measured here, in one process: PSNR/SSIM on the held-out built-in photos
(:mod:`convfactor.train.heldout`), params and MACs (FlopCounterMode, at the latency input), and
the end-to-end speed-up against the original's fastest memory format
(:func:`convfactor.measure.compare.compare_speed`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["PipelineConfig", "compress_finetune_measure", "plan_for_speedup", "planner_target"]


@dataclass
class PipelineConfig:
    model: str = "edsr_baseline_x2"
    speedup: float = 3.0                  # measured end-to-end target (the latency planner's)
    input_size: int = 256                 # LR side of the timed input (batch 1)
    plan_size: int | None = None          # LR side the planner times at (None: input_size)
    threads: int = 2
    steps: int = 400                      # fine-tuning optimizer steps
    batch_size: int = 8
    patch_size: int = 32                  # LR patch side (SR) / patch side (denoising)
    lr: float = 2e-4
    distill_weight: float = 1.0           # L1 to the original's output (plus the L1 to ground truth)
    feature_layers: tuple[str, ...] = ()
    sigma: float = 25.0                   # denoising noise level (0-255 scale)
    eval_side: int | None = None          # centre-crop held-out photos to this side (None: full images)
    eval_limit: int | None = None         # use only the first N held-out photos
    planner: str = "latency"              # "latency" (measured), "budget" (MACs = 1/speedup) or "fixed"
    keep_image_layers: bool = True        # leave convs with <= 4 input or output channels (RGB/grey) dense
    train_side: int | None = None         # centre-crop the training photos (None: full images)
    plan_repeats: int = 10
    plan_e2e_rounds: int = 3
    plan_e2e_repeats: int = 3
    plan_max_iter: int = 4
    plan_margin: float = 0.12             # aim at speedup * (1 + m); accept speedup * [1 + m/2, 1 + 3m/2] (see planner_target)
    speed_repeats: int = 9
    seed: int = 0
    progress: bool = True
    pretrained: bool = True
    checkpoint_dir: str | None = None
    extra: dict = field(default_factory=dict)


def image_layers(model: nn.Module) -> list[str]:
    """Names of the convs that read or write the image itself (<= 4 channels on either side).

    They hold a negligible share of the MACs, and a low rank there loses colour / intensity
    information no later layer can restore, so the pipeline keeps them dense by default.
    """
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and min(m.in_channels, m.out_channels) <= 4]


def planner_target(speedup: float, margin: float) -> tuple[float, float]:
    """(aimed speed-up, relative band) for a plan that must measure *at least* ``speedup`` again later.

    A plan accepted at the band's lower edge is re-timed after fine-tuning, and end-to-end timings
    on a shared CPU vary by a few per cent between runs; so the accepted band starts half a margin
    above the request: aim ``speedup * (1 + m)``, accept ``speedup * [1 + m/2, 1 + 3m/2]``.
    """
    if speedup < 1.0:
        raise ValueError(f"speedup must be at least 1x, got {speedup:g}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"plan margin must be in [0, 1), got {margin:g}")
    aim = speedup * (1 + margin)
    return aim, margin / (2 * (1 + margin))


def plan_for_speedup(model: nn.Module, example: torch.Tensor, cfg: PipelineConfig, log: Callable = print):
    """The latency planner's plan for ``cfg.speedup`` (measured); or a MACs budget of ``1 / speedup``
    / a fixed channel-SVD plan, both clearly labelled as MACs targets."""
    if cfg.planner not in ("latency", "budget", "fixed"):
        raise ValueError(f"planner must be 'latency', 'budget' or 'fixed', got {cfg.planner!r}")
    try:
        from ..rank.planner import plan
    except ImportError:
        plan = None
    exclude = image_layers(model) if cfg.keep_image_layers else []
    if exclude:
        log(f"  keeping the image-facing layers dense: {', '.join(exclude)}")
    if plan is not None and cfg.planner == "latency":
        aim, band = planner_target(cfg.speedup, cfg.plan_margin)
        p = plan(model, example, target=f"speedup={aim:.4g}x", criterion="latency", threads=cfg.threads,
                 exclude=exclude or None, band=band,
                 repeats=cfg.plan_repeats, e2e_rounds=cfg.plan_e2e_rounds, e2e_repeats=cfg.plan_e2e_repeats,
                 max_iter=cfg.plan_max_iter,
                 model_name=cfg.model, progress=cfg.progress)
        return p, f"latency planner (measured speed-up of at least {cfg.speedup:g}x, aimed at {aim:.3g}x)"
    if plan is not None and cfg.planner == "budget":
        p = plan(model, example, target=f"macs={100.0 / cfg.speedup:.4g}%", criterion="budget", model_name=cfg.model,
                 exclude=exclude or None)
        return p, f"MACs budget of 1/{cfg.speedup:g} (a MACs target, not a measured speed-up)"
    log("  fixed channel-SVD plan at per-layer MACs = 1/speed-up; this is a MACs target, not a measured speed-up")
    rules = [{"op_types": ["Conv2d"], "method": "channel_svd", "macs_ratio": 1.0 / cfg.speedup,
              **({"exclude_op_names": exclude} if exclude else {})}]
    return rules, f"fixed channel_svd plan at macs_ratio={1.0 / cfg.speedup:.3g} (a MACs target, not a measured speed-up)"


def _train_data(task: str, cfg: PipelineConfig, scale: int | None):
    from ..data.images import builtin_images
    images = builtin_images("train")
    if cfg.train_side:
        from ..train.heldout import _center_crop
        images = [(n, _center_crop(a, cfg.train_side)) for n, a in images]
    if task == "sr":
        from ..data.sr import SRPatchDataset
        return SRPatchDataset(images, scale, cfg.patch_size, 100_000, augment=True, seed=cfg.seed + 1)
    from ..data.denoise import DenoisePatchDataset
    return DenoisePatchDataset(images, cfg.sigma, cfg.patch_size, 100_000, grey=True, seed=cfg.seed + 1)


def compress_finetune_measure(cfg: PipelineConfig, log: Callable = print) -> dict[str, Any]:
    """Run the whole pipeline; returns models, plan, reports and every measured figure."""
    from .. import models
    from ..compression.api import compress
    from ..measure.compare import compare_speed
    from ..measure.count import count
    from ..train.finetune import finetune
    from ..train.heldout import heldout_quality

    info = models.info(cfg.model)
    task = info["task"]
    if task not in ("sr", "denoise"):
        raise ValueError(f"{cfg.model} is a {task} model; this pipeline handles super-resolution and denoising")
    scale = info.get("scale")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    out: dict[str, Any] = {"config": {k: v for k, v in vars(cfg).items()}, "task": task, "timings_s": {}}
    try:
        log(f"[1/5] loading {cfg.model}" + (" with its shipped weights" if cfg.pretrained else " (random weights)"))
        original = models.get(cfg.model, pretrained=cfg.pretrained).eval()
        channels = info["input_shape"][0]
        example = torch.rand(1, channels, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(0))

        plan_example = example
        if cfg.plan_size and cfg.plan_size != cfg.input_size:
            plan_example = torch.rand(1, channels, cfg.plan_size, cfg.plan_size,
                                      generator=torch.Generator().manual_seed(0))
        log(f"[2/5] planning for a measured {cfg.speedup:g}x speed-up at input {tuple(plan_example.shape)}, "
            f"{cfg.threads} threads")
        t0 = time.perf_counter()
        plan_or_rules, how = plan_for_speedup(original, plan_example, cfg, log)
        out["timings_s"]["plan"] = time.perf_counter() - t0
        out["plan_kind"] = how
        if isinstance(plan_or_rules, list):
            compressed, creport = compress(original, plan_or_rules, example, progress=cfg.progress)
            out["plan"] = {"rules": plan_or_rules}
        else:
            compressed, creport = plan_or_rules.apply(original, example)
            out["plan"] = plan_or_rules.to_dict()
            measured = plan_or_rules.summary.get("measured_speedup")
            log(f"  plan: {len(plan_or_rules.compressed)} layers factorized"
                + (f", planner measured {measured:.2f}x in {plan_or_rules.memory_format}" if measured else ""))
        out["compression_report"] = creport
        before_ft = copy.deepcopy(compressed)

        log(f"[3/5] fine-tuning {cfg.steps} steps with distillation from the original "
            f"(batch {cfg.batch_size}, patch {cfg.patch_size}, Adam lr {cfg.lr:g}, cosine)")
        history: list = []
        t0 = time.perf_counter()
        if cfg.steps > 0:
            data = _train_data(task, cfg, scale)
            finetune(compressed, data, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, schedule="cosine",
                     loss="l1", teacher=original, distill_weight=cfg.distill_weight,
                     feature_layers=cfg.feature_layers, seed=cfg.seed, progress=cfg.progress,
                     checkpoint_dir=cfg.checkpoint_dir, checkpoint_every=max(1, cfg.steps // 5),
                     history=history, desc="fine-tuning")
        out["timings_s"]["finetune"] = time.perf_counter() - t0
        out["finetune_history"] = history

        log("[4/5] measuring quality on the held-out built-in photos"
            + (f" (centre crops of {cfg.eval_side} px)" if cfg.eval_side else " (full images)"))
        t0 = time.perf_counter()
        kw = dict(scale=scale, sigma=cfg.sigma, max_side=cfg.eval_side, limit=cfg.eval_limit)
        q = {"original": heldout_quality(original, task, progress=cfg.progress, **kw),
             "compressed_before_finetune": heldout_quality(before_ft, task, **kw),
             "compressed": heldout_quality(compressed, task, progress=cfg.progress, **kw)}
        out["quality"] = q
        out["timings_s"]["quality"] = time.perf_counter() - t0

        log(f"[5/5] timing original vs compressed end to end ({cfg.threads} threads, both memory formats)")
        t0 = time.perf_counter()
        with torch.no_grad():
            speed = compare_speed(original, compressed, example, threads=cfg.threads, repeats=cfg.speed_repeats,
                                  rounds=3)
        out["timings_s"]["speed"] = time.perf_counter() - t0
        out["speed"] = speed
        c0, c1 = count(original, example), count(compressed, example)
        out["params"] = {"original": c0["params"], "compressed": c1["params"]}
        out["macs"] = {"original": c0["macs"], "compressed": c1["macs"]}
        out["models"] = {"original": original, "compressed": compressed, "compressed_before_finetune": before_ft}
        out["example"] = example
        return out
    finally:
        torch.set_num_threads(previous_threads)


def summary_rows(result: dict) -> list[dict]:
    """One row per operating point: params, MACs, fastest latency, mean quality (and the baseline)."""
    task = result["task"]
    key, bkey = ("psnr_y", "ssim_y") if task == "sr" else ("psnr", "ssim")
    q = result["quality"]
    s = result["speed"]
    ms_o = s.original[s.original_best]["median_ms"]
    ms_c = s.compressed[s.compressed_best]["median_ms"]
    rows = [
        {"label": "original", "params": result["params"]["original"], "macs": result["macs"]["original"],
         "latency_ms": ms_o, "psnr": q["original"]["mean"][key], "ssim": q["original"]["mean"][bkey]},
        {"label": "compressed, before fine-tuning", "params": result["params"]["compressed"],
         "macs": result["macs"]["compressed"], "latency_ms": ms_c,
         "psnr": q["compressed_before_finetune"]["mean"][key], "ssim": q["compressed_before_finetune"]["mean"][bkey]},
        {"label": "compressed + fine-tuned", "params": result["params"]["compressed"],
         "macs": result["macs"]["compressed"], "latency_ms": ms_c,
         "psnr": q["compressed"]["mean"][key], "ssim": q["compressed"]["mean"][bkey]},
        {"label": q["original"]["baseline"], "params": 0, "macs": None, "latency_ms": None,
         "psnr": q["original"]["mean"]["baseline_" + key], "ssim": q["original"]["mean"]["baseline_" + bkey]},
    ]
    return rows

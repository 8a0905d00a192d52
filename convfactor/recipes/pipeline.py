"""Plan -> compress -> fine-tune with distillation -> measure, for the zoo's image-to-image models.

This is what ``convfactor demo`` and the ``models`` benchmark section run.  Every figure is
measured here, in one process, and returned as a :class:`PipelineResult`: PSNR/SSIM on the
held-out built-in photos (:mod:`convfactor.measure.quality`), params and MACs (FlopCounterMode, at
the latency input), and the end-to-end speed-up against the original's fastest memory format
(:func:`convfactor.measure.compare.compare_speed`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import models
from ..compression.api import CompressionReport, compress
from ..compression.calibration import image_facing
from ..compression.fold import fold_factorized
from ..data.images import builtin_images
from ..measure.backends import BF16_FLAGS, fp32_of, get_backend
from ..measure.compare import SpeedComparison, Verdict, compare_speed
from ..measure.count import count
from ..measure.quality import evaluate
from ..files import atomic_write
from ..io import load as load_model
from ..io import save as save_model
from ..rank import LatencyConfig, Plan, RankConfig, Target, plan
from ..train.datasets import training_set
from ..train.finetune import CheckpointConfig, DistillConfig, FinetuneConfig, OptimizerConfig, finetune
from ..utils import cpu_has, plain_data, torch_threads

__all__ = ["PipelineConfig", "default_demo_model", "fit_calibration", "finetune_hints", "PipelineResult", "Counts", "StageTimes", "compress_finetune_measure",
           "summary_rows", "image_layers", "plan_for_speedup", "photo_example"]


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
    plan_repeats: int = 6
    plan_e2e_rounds: int = 3
    plan_e2e_repeats: int = 2
    plan_max_iter: int = 4
    plan_margin: float = 0.12             # aim at speedup * (1 + m); accept speedup * [1 + m/2, 1 + 3m/2] (SpeedupBand.at_least)
    speed_repeats: int = 9
    speed_max_rounds: int = 12            # the final timing adds rounds (up to this) until its interval is +-5%
    timer: Callable | None = None         # ``(module, inputs) -> seconds`` replaces every clock (tests only)
    backend: str = "torch"                # the back-end the plan and the verdict are measured on
    report_backends: tuple[str, ...] = field(default_factory=lambda: default_report_backends())  # timed side by side
    seed: int = 0
    progress: bool = True
    pretrained: bool = True
    checkpoint_dir: str | None = None
    stages: int = 1                       # multi-stage: plan for speedup^(k/K), fine-tune, fold back, repeat
    error: str = "kernel"                 # candidates' error: "kernel" (weight proxy) or "output" (data-aware)
    fit: str = "weights"                  # factors fitted to the "weights", or to "data": training-photo crops,
                                          # layer by layer on what the compressed prefix gives (sequential)
    calibration_crops: int = 8            # with fit="data": that many crops of calibration_side (LR side)
    calibration_side: int = 64
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.error not in ("kernel", "output"):
            raise ValueError(f"error must be 'kernel' (weight proxy) or 'output' (data-aware), got {self.error!r}")
        if self.fit not in ("weights", "data"):
            raise ValueError(f"fit must be 'weights' or 'data' (calibration photos), got {self.fit!r}")
        if not isinstance(self.stages, int) or isinstance(self.stages, bool) or self.stages < 1:
            raise ValueError(f"stages must be a positive int, got {self.stages!r}")
        if self.stages > 1 and self.steps < self.stages:
            raise ValueError(f"{self.stages} stages need at least one fine-tuning step each, got steps={self.steps}")


def image_layers(model: nn.Module, example=None) -> list[str]:
    """Names of the convs that read or write the image itself: <= 4 channels on either side, and, given
    an ``example`` input, those the input reaches or that reach the output through no other conv
    (:func:`convfactor.compression.calibration.image_facing`: SRMD's 18-channel first conv, its
    12-channel sub-pixel last one).

    They hold a small share of the MACs, and a low rank there loses colour / intensity information no
    later layer can restore, so the pipeline keeps them dense by default.
    """
    by_graph = image_facing(model, example) if example is not None else set()
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
            and (min(m.in_channels, m.out_channels) <= 4 or n in by_graph)]


def plan_for_speedup(model: nn.Module, example: torch.Tensor, cfg: PipelineConfig, log: Callable = print):
    """The latency planner's plan for ``cfg.speedup`` (measured); or a MACs budget of ``1 / speedup``
    / a fixed channel-SVD plan, both clearly labelled as MACs targets."""
    if cfg.planner not in ("latency", "budget", "fixed"):
        raise ValueError(f"planner must be 'latency', 'budget' or 'fixed', got {cfg.planner!r}")
    exclude = image_layers(model, example) if cfg.keep_image_layers else []
    if exclude:
        log(f"  keeping the image-facing layers dense: {', '.join(exclude)}")
    if cfg.planner == "latency":
        timing = LatencyConfig(threads=cfg.threads, timer=cfg.timer, backend=cfg.backend, repeats=cfg.plan_repeats,
                               e2e_rounds=cfg.plan_e2e_rounds,
                               e2e_repeats=cfg.plan_e2e_repeats, max_iter=cfg.plan_max_iter, margin=cfg.plan_margin)
        p = plan(model, example, target=Target("speedup", cfg.speedup), criterion="latency", exclude=exclude or None,
                 latency=timing, model_name=cfg.model, progress=cfg.progress, config=RankConfig(error=_error(cfg)))
        credit = p.summary.precision_credit
        if credit:
            log(f"  dense at {credit['backend']} vs {credit['baseline']}: {credit['speedup']:.2f}x (95% interval "
                f"{credit['interval'][0]:.2f}-{credit['interval'][1]:.2f}x)")
        if credit and credit["meets_request"]:
            return [], (f"dense at {cfg.backend}: {credit['speedup']:.2f}x against {credit['baseline']} fp32 "
                        f"(95% interval {credit['interval'][0]:.2f}-{credit['interval'][1]:.2f}x) meets the "
                        f"{cfg.speedup:g}x request with no factorization")
        if p.summary.message:
            log(f"  PLANNER: {p.summary.message}")
        request = credit["low_rank_request"] if credit else cfg.speedup
        rest = (f"; the precision gives {credit['speedup']:.2f}x, low rank is asked for the remaining {request:.3g}x"
                if credit else "")
        return p, (f"latency planner (measured speed-up of at least {request:g}x on {cfg.backend}, "
                   f"aimed at {p.summary.aimed_speedup:.3g}x{rest})")
    if cfg.planner == "budget":
        p = plan(model, example, target=Target("macs", 1.0 / cfg.speedup), criterion="budget", model_name=cfg.model,
                 exclude=exclude or None, config=RankConfig(error=_error(cfg)))
        return p, f"MACs budget of 1/{cfg.speedup:g} (a MACs target, not a measured speed-up)"
    log("  fixed channel-SVD plan at per-layer MACs = 1/speed-up; this is a MACs target, not a measured speed-up")
    rules = [{"op_types": ["Conv2d"], "method": "channel_svd", "macs_ratio": 1.0 / cfg.speedup,
              **({"exclude_op_names": exclude} if exclude else {})}]
    return rules, f"fixed channel_svd plan at macs_ratio={1.0 / cfg.speedup:.3g} (a MACs target, not a measured speed-up)"


def _error(cfg: PipelineConfig) -> str:
    """The planner's candidate error: ``cfg.error``, or with data-aware errors and ``fit="data"``, the
    error the data-aware fit reaches (``"response"``)."""
    return "response" if cfg.error == "output" and cfg.fit == "data" else cfg.error


# ---------------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class Counts:
    """One figure (params or MACs) of the original and of the compressed model."""
    original: int
    compressed: int

    @property
    def ratio(self) -> float:
        """compressed / original."""
        return self.compressed / self.original


@dataclass
class StageTimes:
    """Seconds each stage of the pipeline took."""
    plan: float = 0.0
    finetune: float = 0.0
    quality: float = 0.0
    speed: float = 0.0


#: the models whose quality is measured, as keys of :attr:`PipelineResult.quality`
QUALITY_STAGES = ("original", "compressed_before_finetune", "compressed")


@dataclass
class PipelineResult:
    """Everything :func:`compress_finetune_measure` built and measured."""
    config: PipelineConfig
    task: str                             # "sr" or "denoise"
    scale: int | None                     # the SR scale (None for denoising)
    example: torch.Tensor                 # the timed input, (1, C, input_size, input_size)
    original: nn.Module
    before_finetune: nn.Module            # compressed, before fine-tuning
    compressed: nn.Module                 # compressed and fine-tuned
    plan_kind: str                        # how the plan was made, in words
    plan: dict                            # Plan.to_dict(), or {"rules": [...]} for the fixed plan
    compression_report: CompressionReport
    finetune_history: list[dict]          # {"step", "loss", "lr", "time_s"} per fine-tuning step
    quality: dict[str, dict]              # QUALITY_STAGES -> measure.quality.evaluate_sr/evaluate_denoise result
    speed: SpeedComparison                # original vs fine-tuned compressed, end to end, on ``config.backend``
    params: Counts
    macs: Counts                          # at ``example``
    timings_s: StageTimes = field(default_factory=StageTimes)
    plan_message: str | None = None       # the planner's own warning (e.g. the target is unreachable here)
    speeds: dict[str, SpeedComparison] = field(default_factory=dict)   # every back-end timed, side by side

    @property
    def verdict(self) -> Verdict:
        """The final measured speed-up judged against the request by its interval."""
        return self.speed.verdict(self.config.speedup)

    @property
    def shipped(self) -> str:
        """``"compressed"``, or ``"original"`` when the compressed model is slower with confidence."""
        return "original" if self.verdict.kind == "slower" else "compressed"

    @property
    def shipped_model(self) -> nn.Module:
        return self.original if self.shipped == "original" else self.compressed

    @property
    def baseline(self) -> str:
        """The trivial baseline's key prefix in :attr:`quality`: ``"bicubic"`` (SR) or ``"noisy"``."""
        return "bicubic" if self.task == "sr" else "noisy"

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able figures (no models, no tensors)."""
        config = dict(dataclasses.asdict(self.config), timer="injected" if self.config.timer else None)
        return {"config": config, "task": self.task, "scale": self.scale,
                "input_shape": list(self.example.shape), "plan_kind": self.plan_kind, "plan": self.plan,
                "compression_report": self.compression_report.to_dict(), "finetune_history": self.finetune_history,
                "quality": self.quality, "speed": self.speed.to_dict(), "params": dataclasses.asdict(self.params),
                "macs": dataclasses.asdict(self.macs), "timings_s": dataclasses.asdict(self.timings_s),
                "plan_message": self.plan_message, "verdict": dataclasses.asdict(self.verdict),
                "speeds": {k: v.to_dict() for k, v in self.speeds.items()},
                "shipped": self.shipped}


# ---------------------------------------------------------------------------------------------- stages
def _timed(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds it took)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _task_of(cfg: PipelineConfig) -> dict:
    """The zoo facts of ``cfg.model`` (``models.info``), which must be an SR or denoising model."""
    info = models.info(cfg.model)
    if info["task"] not in ("sr", "denoise"):
        raise ValueError(f"{cfg.model} is a {info['task']} model; this pipeline handles super-resolution and denoising")
    return info


def _inputs(cfg: PipelineConfig, info: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(timed input, planning input), batch 1, seeded: uniform noise (speed does not depend on the
    values); with ``cfg.error == "output"`` the planning input is :func:`photo_example`, since the
    data-aware errors are only as good as the data they are measured on."""
    def noise(side: int) -> torch.Tensor:
        return torch.rand(1, info["input_shape"][0], side, side, generator=torch.Generator().manual_seed(0))
    example = noise(cfg.input_size)
    side = cfg.plan_size or cfg.input_size
    if cfg.error == "output":
        return example, photo_example(info, cfg, side)
    return example, example if side == cfg.input_size else noise(side)


def photo_example(info: dict, cfg: PipelineConfig, side: int) -> torch.Tensor:
    """(1, C, side, side): a 2x2 mosaic of four seeded model-input patches of the built-in *training*
    photos (LR patches for SR, noisy patches for denoising), so one batch-1 example shows the
    planner several photos' statistics.  Never the held-out photos."""
    half = (side + 1) // 2
    data = training_set(info["task"], scale=info.get("scale"), sigma=cfg.sigma, patch_size=half, length=4,
                        seed=cfg.seed + 7, grey=info["input_shape"][0] == 1, max_side=cfg.train_side)
    tiles = [data[i][0] for i in range(4)]
    mosaic = torch.cat([torch.cat(tiles[:2], dim=2), torch.cat(tiles[2:], dim=2)], dim=1)
    return mosaic[None, :, :side, :side].contiguous()


def _compress(original: nn.Module, plan_or_rules, example: torch.Tensor, cfg: PipelineConfig,
              log: Callable) -> tuple[nn.Module, CompressionReport, dict]:
    """Factorize a copy of ``original`` by a plan (or the fixed plan's rules) -> (model, report, plan dict)."""
    if plan_or_rules == []:                         # dense at a lower precision met the request
        return copy.deepcopy(original), CompressionReport(input_shape=tuple(example.shape)), {"rules": []}
    calibration = fit_calibration(_task_of(cfg), cfg) if cfg.fit == "data" else None
    if calibration is not None:
        log(f"  fitting to the responses on {len(calibration)} training-photo crops, layer by layer")
    if isinstance(plan_or_rules, list):
        rules = [dict(rule, data_aware=True) for rule in plan_or_rules] if calibration else plan_or_rules
        compressed, report = compress(original, rules, example, progress=cfg.progress, calibration=calibration)
        return compressed, report, {"rules": rules}
    compressed, report = plan_or_rules.apply(original, example, allow_unreachable=True, calibration=calibration)
    measured = plan_or_rules.summary.measured_speedup
    log(f"  plan: {len(plan_or_rules.compressed)} layers factorized"
        + (f", planner measured {measured:.2f}x in {plan_or_rules.memory_format}" if measured else ""))
    return compressed, report, plan_or_rules.to_dict()


def fit_calibration(info: dict, cfg: PipelineConfig) -> list[torch.Tensor]:
    """``cfg.calibration_crops`` seeded model-input crops ``(1, C, side, side)`` of the built-in *training*
    photos (LR crops for SR), for the data-aware fit; never the held-out photos.  With ``cfg.train_side`` the
    crops are at most as large as the cropped photos allow."""
    side = cfg.calibration_side
    if cfg.train_side:
        side = max(4, min(side, cfg.train_side // (info.get("scale") or 1)))
    return training_crops(info, cfg, side, cfg.calibration_crops, seed=cfg.seed + 13)


def training_crops(info: dict, cfg: PipelineConfig, side: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` seeded model inputs ``(1, C, side, side)`` drawn from the built-in training photos (LR
    patches for SR, noisy patches for denoising), as ``cfg`` crops and degrades them."""
    data = training_set(info["task"], scale=info.get("scale"), sigma=cfg.sigma, patch_size=side, length=count,
                        seed=seed, grey=info["input_shape"][0] == 1, max_side=cfg.train_side)
    return [data[i][0][None] for i in range(count)]


def _finetune(compressed: nn.Module, original: nn.Module, info: dict, cfg: PipelineConfig) -> list[dict]:
    """Fine-tune ``compressed`` in place: L1 to the ground truth + L1 to ``original``'s output; the history."""
    history: list[dict] = []
    if cfg.steps <= 0:
        return history
    data = training_set(info["task"], scale=info.get("scale"), sigma=cfg.sigma, patch_size=cfg.patch_size,
                        seed=cfg.seed + 1, grey=info["input_shape"][0] == 1, max_side=cfg.train_side)
    config = FinetuneConfig(steps=cfg.steps, batch_size=cfg.batch_size, loss="l1", seed=cfg.seed,
                            optimizer=OptimizerConfig(lr=cfg.lr, schedule="cosine"),
                            distill=DistillConfig(weight=cfg.distill_weight, feature_layers=cfg.feature_layers),
                            checkpoint=CheckpointConfig(cfg.checkpoint_dir, every=max(1, cfg.steps // 5)),
                            progress=cfg.progress, desc="fine-tuning")
    finetune(compressed, data, config, teacher=original, history=history)
    return history


def _quality(stages: dict[str, nn.Module], info: dict, cfg: PipelineConfig) -> dict[str, dict]:
    """PSNR/SSIM of each model of ``stages`` and of the baseline on the held-out built-in photos."""
    images = builtin_images("test", max_side=cfg.eval_side, limit=cfg.eval_limit)
    options = ({"scale": info["scale"]} if info["task"] == "sr" else
               {"sigma": cfg.sigma, "grey": info["input_shape"][0] == 1})
    quiet = {"compressed_before_finetune"}          # an intermediate: no progress bar
    return {stage: evaluate(model, info["task"], images, progress=cfg.progress and stage not in quiet, **options)
            for stage, model in stages.items()}


def _speed(original: nn.Module, compressed: nn.Module, example: torch.Tensor, cfg: PipelineConfig,
           log: Callable) -> tuple[dict[str, SpeedComparison], Counts, Counts]:
    """End-to-end speed-ups on ``cfg.backend`` and every report back-end (each against its own fastest
    dense form, same process), and params / MACs at ``example``.  A back-end that cannot run here (its
    package is missing, export fails) is left out with a line saying why."""
    c0, c1 = count(original, example), count(compressed, example)      # once, not once per back-end
    speeds = {}
    for backend in dict.fromkeys((cfg.backend, *cfg.report_backends)):
        try:
            with torch.no_grad():
                speeds[backend] = compare_speed(original, compressed, example, threads=cfg.threads, backend=backend,
                                                repeats=cfg.speed_repeats, rounds=3, timer=cfg.timer,
                                                max_rounds=max(3, cfg.speed_max_rounds), count_macs=False)
        except (ValueError, RuntimeError) as exc:
            if backend == cfg.backend:
                raise
            log(f"  {backend}: not timed ({str(exc).splitlines()[0][:160]})")
            continue
        speeds[backend].macs_original, speeds[backend].macs_compressed = c0["macs"], c1["macs"]
        log(f"  {backend}: {speeds[backend].speedup:.2f}x")
        base = fp32_of(backend)
        if base is not None:                # a lower precision, also against the dense fp32 model it replaces
            key = f"{backend} vs {base}"
            with torch.no_grad():
                speeds[key] = compare_speed(original, compressed, example, threads=cfg.threads, backend=backend,
                                            baseline=base, repeats=cfg.speed_repeats, rounds=3, timer=cfg.timer,
                                            max_rounds=max(3, cfg.speed_max_rounds), count_macs=False)
            speeds[key].macs_original, speeds[key].macs_compressed = c0["macs"], c1["macs"]
            log(f"  {key}: {speeds[key].speedup:.2f}x")
    return speeds, Counts(c0["params"], c1["params"]), Counts(c0["macs"], c1["macs"])


def default_demo_model() -> str:
    """The demo's model: ``srmd_x2``, the published, well-trained SRMD x2 (what users bring), where its
    wheel is installed (``make`` installs it); else ``edsr_baseline_x2``, trained by this project."""
    from ..models import published
    return "srmd_x2" if published.installed("srmd_x2") else "edsr_baseline_x2"


def finetune_hints(name: str) -> dict:
    """The fine-tuning settings that suit model ``name`` better than the defaults (``models.info``'s
    ``"finetune"``, e.g. ``{"lr": 5e-6, "patch_size": 48}`` for SRMD); ``{}`` for none or an unknown name."""
    try:
        return dict(models.info(name).get("finetune", {}))
    except (ValueError, KeyError):
        return {}


def default_plan_backend() -> str:
    """The back-end the demo plans and judges on by default: OpenVINO, the fastest CPU runtime here and the
    one whose figure does not depend on the allocator (measured: 3.39x at 0.121 dB where eager measured
    2.83x, same run); eager PyTorch where OpenVINO is not installed."""
    import importlib.util
    return "openvino" if importlib.util.find_spec("openvino") is not None else "torch"


def default_report_backends() -> tuple[str, ...]:
    """The back-ends the final models are timed on by default: eager, ONNX Runtime, OpenVINO, and
    OpenVINO in bf16 where the CPU runs bf16 natively (AVX512-BF16 or AMX)."""
    bf16 = ("openvino:precision=bf16",) if cpu_has(*BF16_FLAGS) else ()
    return ("torch", "onnxruntime", "openvino", *bf16)


def runtime_stages(stages: dict[str, nn.Module], example: torch.Tensor, info: dict, cfg: PipelineConfig,
                   log: Callable) -> dict[str, nn.Module]:
    """The original and the fine-tuned model as each lower-precision report back-end serves them
    (``original@openvino:precision=bf16``, ...), so their quality is measured through the runtime;
    int8 is calibrated on training-photo crops.  A back-end that cannot run here is left out, saying why."""
    out: dict[str, nn.Module] = {}
    for backend in dict.fromkeys((cfg.backend, *cfg.report_backends)):
        if fp32_of(backend) is None:
            continue
        try:
            runtime = get_backend(backend, threads=cfg.threads, calibration=tuple(_calibration(info, cfg, example)))
            for stage in ("original", "compressed"):
                out[f"{stage}@{backend}"] = runtime.deployed(stages[stage], example)
        except (ValueError, RuntimeError) as exc:
            log(f"  {backend}: quality not measured ({str(exc).splitlines()[0][:160]})")
    return out


def _calibration(info: dict, cfg: PipelineConfig, example: torch.Tensor) -> list:
    """Eight training-photo crops shaped like ``example`` (model inputs), for int8 calibration."""
    return [c.numpy() for c in training_crops(info, cfg, int(example.shape[-1]), 8, seed=cfg.seed + 11)]


# ---------------------------------------------------------------------------------------------- multi-stage
@dataclass
class _Stage:
    """What one stage of :func:`_staged` hands on: the fine-tuned model, its state before fine-tuning,
    the compression report, the plan (as a dict) and how it was made, the fine-tuning history."""
    compressed: nn.Module
    before_finetune: nn.Module
    report: CompressionReport
    plan: dict
    how: str
    history: list[dict]


def stage_settings(cfg: PipelineConfig, k: int) -> PipelineConfig:
    """Stage ``k`` (0-based) of ``cfg.stages``: speed-up ``cfg.speedup ** ((k + 1) / K)`` (the last one
    is the request), ``cfg.steps / K`` fine-tuning steps (the last takes the remainder), checkpoints
    in ``checkpoint_dir/stage{k + 1}``."""
    K = cfg.stages
    steps = cfg.steps // K + (cfg.steps % K if k == K - 1 else 0)
    ckpt = f"{cfg.checkpoint_dir}/stage{k + 1}" if cfg.checkpoint_dir else None
    return dataclasses.replace(cfg, speedup=cfg.speedup ** ((k + 1) / K), steps=steps, checkpoint_dir=ckpt, stages=1)


def _one_stage(base: nn.Module, original: nn.Module, example, plan_example, info: dict, cfg: PipelineConfig,
               log: Callable) -> tuple[_Stage, float, float]:
    """Plan ``base`` for ``cfg.speedup``, factorize, fine-tune against ``original`` -> (stage, plan s, fine-tune s).
    With ``cfg.checkpoint_dir``, a finished stage found there is loaded instead of redone."""
    done = Path(cfg.checkpoint_dir, "stage.json") if cfg.checkpoint_dir else None
    settings = _settings_record(cfg)
    if done is not None and done.is_file():
        record = json.loads(done.read_text())
        if record.get("settings") != settings:
            raise ValueError(f"{done.parent} holds a finished stage made with other settings; remove it to start over")
        plan_or_rules = record["plan"]["rules"] if "rules" in record["plan"] else Plan.from_dict(record["plan"])
        compressed, report, plan_dict = _compress(base, plan_or_rules, example, cfg, log)
        before = copy.deepcopy(compressed)
        compressed.load_state_dict(load_model(done.parent / "model", base).state_dict())
        log(f"  stage found finished in {done.parent}; loaded")
        return _Stage(compressed, before, report, plan_dict, record["how"], record["history"]), 0.0, 0.0
    if done is not None:
        done.parent.mkdir(parents=True, exist_ok=True)      # the fine-tuning checkpoints go there too
    (plan_or_rules, how), plan_s = _timed(plan_for_speedup, base, plan_example, cfg, log)
    compressed, report, plan_dict = _compress(base, plan_or_rules, example, cfg, log)
    before = copy.deepcopy(compressed)
    history, finetune_s = _timed(_finetune, compressed, original, info, cfg)
    if done is not None:
        save_model(compressed, done.parent / "model", overwrite=True)
        atomic_write(done, json.dumps(plain_data({"plan": plan_dict, "how": how, "history": history,
                                                  "settings": settings})))
    return _Stage(compressed, before, report, plan_dict, how, history), plan_s, finetune_s


def _settings_record(cfg: PipelineConfig) -> dict:
    """The settings a finished stage must match to be reused (what shapes its plan and weights)."""
    keep = dataclasses.asdict(cfg)
    for name in ("progress", "timer", "checkpoint_dir", "report_backends", "speed_repeats", "speed_max_rounds",
                 "eval_side", "eval_limit", "extra"):
        keep.pop(name, None)
    return json.loads(json.dumps(plain_data(keep)))


def _staged(original: nn.Module, example, plan_example, info: dict, cfg: PipelineConfig, times: "StageTimes",
            log: Callable) -> _Stage:
    """MUSCO-style stages (see :mod:`convfactor.compression.fold`): each plans the previous stage's
    fine-tuned model folded back to dense, for a larger share of the request."""
    base, history, stage = original, [], None
    for k in range(cfg.stages):
        sub = stage_settings(cfg, k)
        log(f"  stage {k + 1}/{cfg.stages}: planning for {sub.speedup:.3g}x, then {sub.steps} fine-tuning steps")
        stage, plan_s, finetune_s = _one_stage(base, original, example, plan_example, info, sub, log)
        times.plan += plan_s
        times.finetune += finetune_s
        history += [{**h, "stage": k + 1} for h in stage.history]
        if k + 1 < cfg.stages:
            base, kept = fold_factorized(stage.compressed)
            if kept:
                raise ValueError(f"stage {k + 1}: cannot fold {', '.join(kept)} back to dense: {next(iter(kept.values()))}")
    stage.history = history
    stage.how = f"{cfg.stages} stages, the last: {stage.how}"
    return stage


# ---------------------------------------------------------------------------------------------- the workflow
def compress_finetune_measure(cfg: PipelineConfig, log: Callable = print) -> PipelineResult:
    """Run the whole pipeline (plan, compress, fine-tune, measure) with ``cfg.threads`` torch threads."""
    info = _task_of(cfg)
    times = StageTimes()
    with torch_threads(cfg.threads):
        log(f"[1/5] loading {cfg.model}" + (" with its shipped weights" if cfg.pretrained else " (random weights)"))
        original = models.get(cfg.model, pretrained=cfg.pretrained).eval()
        example, plan_example = _inputs(cfg, info)
        log(f"[2/5] planning for a measured {cfg.speedup:g}x speed-up at input {tuple(plan_example.shape)}, "
            f"{cfg.threads} threads")
        if cfg.stages > 1:
            log(f"[3/5] {cfg.stages} stages of planning and fine-tuning ({cfg.steps} steps in all, distillation "
                f"from the original, batch {cfg.batch_size}, patch {cfg.patch_size}, Adam lr {cfg.lr:g}, cosine)")
            st = _staged(original, example, plan_example, info, cfg, times, log)
            compressed, report, plan_dict, how, history, before_ft = (st.compressed, st.report, st.plan, st.how,
                                                                      st.history, st.before_finetune)
        else:
            (plan_or_rules, how), times.plan = _timed(plan_for_speedup, original, plan_example, cfg, log)
            compressed, report, plan_dict = _compress(original, plan_or_rules, example, cfg, log)
            before_ft = copy.deepcopy(compressed)
            if plan_or_rules == []:
                log("[3/5] no fine-tuning: nothing was factorized (the dense model at this precision is the plan)")
                history = []
            else:
                log(f"[3/5] fine-tuning {cfg.steps} steps with distillation from the original "
                    f"(batch {cfg.batch_size}, patch {cfg.patch_size}, Adam lr {cfg.lr:g}, cosine)")
                history, times.finetune = _timed(_finetune, compressed, original, info, cfg)
        log("[4/5] measuring quality on the held-out built-in photos"
            + (f" (centre crops of {cfg.eval_side} px)" if cfg.eval_side else " (full images)"))
        stages = dict(zip(QUALITY_STAGES, (original, before_ft, compressed)))
        stages.update(runtime_stages(stages, example, info, cfg, log))
        quality, times.quality = _timed(_quality, stages, info, cfg)
        log(f"[5/5] timing original vs compressed end to end ({cfg.threads} threads, both memory formats; "
            f"back-ends: {', '.join(dict.fromkeys((cfg.backend, *cfg.report_backends)))})")
        (speeds, params, macs), times.speed = _timed(_speed, original, compressed, example, cfg, log)
    result = PipelineResult(config=cfg, task=info["task"], scale=info.get("scale"), example=example, original=original,
                            before_finetune=before_ft, compressed=compressed, plan_kind=how, plan=plan_dict,
                            compression_report=report, finetune_history=history, quality=quality,
                            speed=speeds.get(f"{cfg.backend} vs {fp32_of(cfg.backend)}", speeds[cfg.backend]),
                            speeds=speeds, params=params, macs=macs, timings_s=times,
                            plan_message=plan_dict.get("summary", {}).get("message"))
    log(f"  {result.verdict.line}")
    if result.shipped == "original":
        log("  falling back to the original model: the compressed one is slower with confidence")
    return result


def summary_rows(result: PipelineResult) -> list[dict]:
    """One row per operating point: params, MACs, fastest latency, mean quality; then the baseline's row."""
    q, s, b = result.quality, result.speed, result.baseline
    ms = {"original": s.original[s.original_best]["median_ms"],
          "compressed": s.compressed[s.compressed_best]["median_ms"]}

    def row(label: str, stage: str, model: str) -> dict:
        return {"label": label, "params": getattr(result.params, model), "macs": getattr(result.macs, model),
                "latency_ms": ms[model], "psnr": q[stage]["psnr"], "ssim": q[stage]["ssim"]}
    rows = [row("original", "original", "original"),
            row("compressed, before fine-tuning", "compressed_before_finetune", "compressed"),
            row("compressed + fine-tuned", "compressed", "compressed")]
    for stage in (k for k in q if "@" in k):                 # quality through a lower-precision runtime
        model, backend = stage.split("@", 1)
        timed = result.speeds.get(backend)
        ms_there = timed.original[timed.original_best] if timed and model == "original" else \
            timed.compressed[timed.compressed_best] if timed else None
        rows.append({**row(f"{'original' if model == 'original' else 'compressed + fine-tuned'} on {backend}",
                           stage, model), "latency_ms": ms_there["median_ms"] if isinstance(ms_there, dict) else None})
    return rows + [{"label": "bicubic" if b == "bicubic" else "noisy input", "params": 0, "macs": None,
                    "latency_ms": None, "psnr": q["original"][f"{b}_psnr"], "ssim": q["original"][f"{b}_ssim"]}]

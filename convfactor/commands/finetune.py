"""convfactor finetune MODEL --data builtin|PATH -o OUT [--distill-from TEACHER] [--checkpoint-dir DIR] ...

A checkpoint records the run's settings: a re-run with the same ones resumes it, one with other
settings (a new ``--lr``, ``--optimizer``, data, ...) is refused, or with ``--overwrite`` starts fresh.
An existing, non-empty OUT is written into only with ``--overwrite`` (convfactor's own files replaced,
the others kept).

Everything that can be checked cheaply is checked before the expensive set-up (loading the teacher,
building the training data): the task and SR scale, the checkpoint's settings, the teacher's source, and
(on the model's example input) that the model fits the task's data: its input channels, and an output of
the target's shape.  The first line printed says what the run is about to do.  Ctrl-C stops after the
step in progress, writes its checkpoint and exits 130 with one line; the same command resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .. import io, models
from ..train.datasets import training_set
from ..train.finetune import (CheckpointConfig, DistillConfig, FinetuneConfig, Interrupted, OptimizerConfig,
                              finetune, resume_step)
from ..utils import UnknownName, torch_threads
from .common import add_model_arguments, load_model

HELP = ("fine-tune a (compressed) model: Adam/SGD with cosine/step schedules, optional distillation from "
        "the original, atomic checkpoints and resume (also after Ctrl-C)")

TASKS = ("sr", "denoise", "classification")
#: the task loss of each task (``--loss`` default)
TASK_LOSS = {"sr": "l1", "denoise": "mse", "classification": "ce"}
#: spec prefixes whose model comes with its weights (the teacher needs no --distill-weights)
WEIGHTED_SPECS = ("spandrel",)
#: the tasks as messages name them
TASK_NAMES = {"sr": "SR", "denoise": "denoising", "classification": "classification"}


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--data", default="builtin",
                   help="'builtin' (the built-in training photos; for classification, patches of them as classes) "
                        "or a folder (SR layouts, images, CIFAR-10 python batches, ImageFolder) (default: %(default)s)")
    p.add_argument("--task", choices=TASKS, help="default: the model's task (a built-in model's, or the one a "
                                                 "convfactor directory records; needed for other models)")
    p.add_argument("--scale", type=int, help="SR upscaling factor (default: the built-in model's, or the one the "
                                             "directory records; needed for another SR model)")
    _add_training_arguments(p)
    _add_distill_arguments(p)
    p.add_argument("--checkpoint-dir", help="where checkpoints go; one found there made with the same settings is "
                                            "resumed (default: OUT.ckpt)")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="steps between checkpoints; one is also written at the end and on Ctrl-C (default: "
                        "%(default)s)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over, removing the checkpoint found (default: resume it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches and the noise (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, usually the CPU count)")
    p.add_argument("-o", "--output", required=True, help="output directory (convfactor format)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing OUT (convfactor's files replaced, others kept), and start fresh when "
                        "the checkpoint was written with other settings")


def _add_training_arguments(p) -> None:
    p.add_argument("--steps", type=int, default=1000,
                   help="optimizer steps (default: %(default)s); a step's time grows with the model, batch size and "
                        "patch area")
    p.add_argument("--batch-size", type=int, default=16, help="patches per step (default: %(default)s)")
    p.add_argument("--patch-size", type=int, help="training patch side: the LR side for SR (default: 48 for SR, 40 "
                                                  "for denoising; classification: the images' own size)")
    p.add_argument("--sigma", type=float, default=25.0,
                   help="noise level for denoising, 0-255 scale (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="base learning rate (default: %(default)s)")
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default="adam",
                   help="optimizer (default: %(default)s; sgd is Nesterov with --momentum)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default: %(default)s)")
    p.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine",
                   help="learning-rate schedule over --steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default: %(default)s)")
    p.add_argument("--step-size", type=int, help="steps between decays for --schedule step (default: a third of "
                                                 "--steps)")
    p.add_argument("--gamma", type=float, default=0.1,
                   help="decay factor for --schedule step (default: %(default)s)")
    p.add_argument("--loss", choices=["l1", "mse", "ce"], help="task loss (default: l1 for SR, mse for denoising, "
                                                               "ce for classification)")
    p.add_argument("--task-weight", type=float, default=1.0,
                   help="weight of the loss to the ground truth; 0: pure distillation (default: %(default)s)")


def _add_distill_arguments(p) -> None:
    p.add_argument("--distill-from", metavar="TEACHER",
                   help="distil from TEACHER: 'base' (the directory's base model), a built-in model name (its "
                        "shipped weights), a convfactor directory (with its weights), or a model spec "
                        "(package.module:factory, torchvision:NAME, timm:NAME) with --distill-weights "
                        "(default: no distillation)")
    p.add_argument("--distill-weights", metavar="FILE",
                   help="the teacher's weights, as --weights takes them (.safetensors, a state dict or a "
                        "convfactor directory); needed for a spec teacher, replaces a built-in one's shipped "
                        "weights (default: none)")
    p.add_argument("--distill-weight", type=float, default=1.0,
                   help="weight of the output distillation loss (default: %(default)s)")
    p.add_argument("--feature-layers", nargs="*", default=[], metavar="LAYER",
                   help="layer names for feature distillation, present in both models (default: none)")
    p.add_argument("--feature-weight", type=float, default=1.0,
                   help="weight of the feature distillation loss (default: %(default)s)")


def _resolved(source: str) -> str:
    """A path as an absolute path (so a re-run from another directory is the same run), else as given."""
    return str(Path(source).resolve()) if Path(source).exists() else source


def run_info(args, task: str, scale: int | None = None) -> dict:
    """What identifies a run besides :class:`FinetuneConfig`: recorded in and compared with its checkpoint
    (a key an older checkpoint lacks is not compared, so those still resume)."""
    info = {"model": _resolved(args.model), "weights": _resolved(args.weights) if args.weights else None,
            "data": _resolved(args.data), "task": task, "distill_from": _teacher_label(args.distill_from),
            "sigma": args.sigma if task == "denoise" else None, "patch_size": args.patch_size}
    if getattr(args, "distill_weights", None):
        info["distill_weights"] = _resolved(args.distill_weights)
    if task == "sr":
        info["scale"] = scale
    return info


def _teacher_label(source: str | None) -> str | None:
    """``--distill-from`` as recorded: a convfactor directory absolute, anything else as given."""
    if source is None or source == "base" or not (Path(source) / "recipe.json").is_file():
        return source
    return str(Path(source).resolve())


def recorded(source: str) -> dict:
    """The metadata a convfactor directory's recipe records (``{}`` for anything else)."""
    recipe = Path(source) / "recipe.json"
    if not recipe.is_file():
        return {}
    return json.loads(recipe.read_text()).get("metadata") or {}


def task_and_scale(args, base: str | None) -> tuple[str, int | None]:
    """The task and (SR) scale: as given, else as the directory records them, else the built-in model's."""
    info = models.info(base) if base else {}
    meta = recorded(args.model)
    task = args.task or meta.get("task") or info.get("task")
    if task not in TASKS:
        raise ValueError("cannot tell the task of this model; pass --task sr|denoise|classification")
    if args.scale is not None and task != "sr":
        raise ValueError(f"--scale is for SR models; this is a {task} task")
    if args.scale is not None and args.scale < 1:
        raise ValueError(f"--scale must be >= 1, got {args.scale}")
    scale = (args.scale or meta.get("scale") or info.get("scale")) if task == "sr" else None
    if task == "sr" and not scale:
        raise ValueError(f"cannot tell the SR scale of {args.model}; pass --scale N (its upscaling factor)")
    return task, scale


def teacher_source(args, base: str | None) -> tuple[str, str | None] | None:
    """``(model, weights)`` of the teacher ``--distill-from`` and ``--distill-weights`` name (None: no
    teacher), checked without loading anything."""
    source, weights = args.distill_from, getattr(args, "distill_weights", None)
    if source is None:
        if weights:
            raise ValueError("--distill-weights needs --distill-from (the teacher's model)")
        return None
    if source == "base":
        if base is None:
            raise ValueError(f"--distill-from base needs a model that records its base model; {args.model} records "
                             f"none, so name the teacher (a model name or directory)")
        source = base
    if (Path(source) / "recipe.json").is_file():
        if weights:
            raise ValueError(f"--distill-from {source} is a convfactor directory and holds its own weights; "
                             f"drop --distill-weights")
        return source, None
    if Path(source).exists():
        raise ValueError(f"--distill-from {source} is not a convfactor model directory; name the teacher's model "
                         f"(built-in name or spec) there and pass this file as --distill-weights")
    if models.thirdparty.is_spec(source):
        if not weights and source.split(":", 1)[0] not in WEIGHTED_SPECS:
            raise ValueError(f"--distill-from {source} needs --distill-weights FILE: convfactor ships no weights "
                             f"for it, and a teacher with random weights teaches nothing")
        return source, weights
    if source not in models.names():
        raise ValueError(f"--distill-from {source!r} is not 'base', a built-in model, a convfactor directory or "
                         f"a model spec (package.module:factory, torchvision:NAME, timm:NAME)")
    if not weights and source not in models.pretrained_names():
        raise ValueError(f"{source} has no shipped weights; pass its weights as --distill-weights FILE")
    return source, weights


def load_teacher(args, source: tuple[str, str | None], example: torch.Tensor):
    """The teacher of :func:`teacher_source`, through the same loader as MODEL, on the model's input."""
    name, weights = source
    teacher_args = argparse.Namespace(**{**vars(args), "model": name, "weights": weights,
                                         "pretrained": weights is None, "random_init": False,
                                         "input_size": "x".join(str(v) for v in example.shape)})
    try:
        teacher, _ = load_model(teacher_args)
    except (ValueError, OSError, UnknownName) as exc:
        raise ValueError(f"--distill-from {args.distill_from}: {str(exc.args[0] if exc.args else exc)}") from None
    return teacher


def _shape(t) -> str:
    return "x".join(str(v) for v in t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _data_channels(task: str, channels: int) -> int:
    """The channels of the task's training inputs: RGB, or for denoising grey or RGB as the model takes."""
    return channels if task == "denoise" and channels in (1, 3) else 3


def check_fits_task(model, example: torch.Tensor, task: str, scale: int | None, teacher=None) -> None:
    """Refuse (before the data is built) a model whose input channels differ from the task's data, whose
    output on ``example`` is not the shape the task's targets have, or whose teacher's output differs."""
    if example.ndim != 4:
        raise ValueError(f"{task} data are images (batch x channels x height x width); the model's example input "
                         f"is {_shape(example)}")
    channels = example.shape[1]
    if channels != _data_channels(task, channels):
        kind = "grey (1 channel) or RGB (3 channels)" if task == "denoise" else "RGB (3 channels)"
        raise ValueError(f"{TASK_NAMES[task]} data is {kind}; the model takes {channels} input "
                         f"channel{'s' * (channels != 1)} (example input {_shape(example)})")
    with torch.no_grad():
        out = model.eval()(example)
        want = {"sr": (*example.shape[:2], example.shape[2] * (scale or 1), example.shape[3] * (scale or 1)),
                "denoise": tuple(example.shape)}.get(task)   # SR and denoising targets have the input's channels
        if task == "classification" and (not isinstance(out, torch.Tensor) or out.ndim != 2):
            raise ValueError(f"a classifier's output is (batch, classes); the model gives {_shape(out)}")
        if want is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != want):
            what = f"an x{scale} SR output" if task == "sr" else "a denoiser's output (its input's shape)"
            raise ValueError(f"the model turns a {_shape(example)} input into {_shape(out)}, not {what} "
                             f"{'x'.join(map(str, want))}; check --task{' and --scale' if task == 'sr' else ''}")
        if teacher is not None:
            t_out = teacher.eval()(example)
            if _shape(t_out) != _shape(out):
                raise ValueError(f"the teacher's output {_shape(t_out)} differs from the model's {_shape(out)} "
                                 f"on a {_shape(example)} input")


def check_classes(model, example, data, source: str) -> None:
    """Refuse a classification set whose class count differs from the model's outputs (before training:
    a label beyond the outputs fails mid-run, fewer classes train a mismatched head)."""
    classes = getattr(data, "classes", None)
    with torch.no_grad():
        out = model.eval()(example)
    if classes is None or not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] == len(classes):
        return
    what = ("the built-in data (photos for SR and denoising; for classification, patches of its "
            f"{len(classes)} photos as classes)") if source == "builtin" else f"--data {source} ({len(classes)} classes)"
    raise ValueError(f"{what} does not match the model's {out.shape[1]} outputs; pass --data with CIFAR-10 python "
                     f"batches or an ImageFolder tree of {out.shape[1]} classes")


def finetune_config(args, loss: str, info: dict | None = None) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of the command line (``info``: :func:`run_info`)."""
    optimizer = OptimizerConfig(args.optimizer, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
                                schedule=args.schedule, warmup=args.warmup, step_size=args.step_size, gamma=args.gamma)
    distill = DistillConfig(weight=args.distill_weight, feature_layers=tuple(args.feature_layers),
                            feature_weight=args.feature_weight)
    checkpoint = CheckpointConfig(args.checkpoint_dir or f"{args.output}.ckpt", every=args.checkpoint_every,
                                  resume=not args.no_resume, restart_on_mismatch=getattr(args, "overwrite", False),
                                  run_info=info or {})
    return FinetuneConfig(steps=args.steps, batch_size=args.batch_size, loss=loss, task_weight=args.task_weight,
                          seed=args.seed, optimizer=optimizer, distill=distill, checkpoint=checkpoint)


def plan_line(args, task: str, scale: int | None, config: FinetuneConfig, threads: int) -> str:
    """The first line printed: what the run is about to do."""
    what = {"sr": f"SR x{scale}", "denoise": f"denoising at sigma {args.sigma:g}"}.get(task, task)
    teacher = f", distilling from {args.distill_from}" if args.distill_from else ""
    return (f"fine-tuning {args.model} ({what}) for {config.steps} steps of batch {config.batch_size} on cpu "
            f"({threads} thread{'s' * (threads != 1)}), data: {args.data}{teacher}; a checkpoint every "
            f"{config.checkpoint.every} steps in {config.checkpoint.directory}")


def interrupted_line(stop: Interrupted) -> str:
    """The one line of a Ctrl-C during training."""
    head = f"convfactor finetune: interrupted at step {stop.step} of {stop.steps}"
    if stop.saved:
        return f"{head}; checkpoint saved to {stop.directory}; re-run the same command to resume"
    if stop.checkpoint_step is not None:
        return (f"{head} (inside a step); the checkpoint at step {stop.checkpoint_step} in {stop.directory} is "
                f"kept; re-run the same command to resume from it")
    return f"{head}, before any checkpoint; nothing saved"


def run(args) -> int:
    """The command; Ctrl-C ends it with one line and exit status 130 (see :func:`interrupted_line`)."""
    stage = {"trained": None}
    try:
        return _finetune(args, stage)
    except Interrupted as stop:
        print(interrupted_line(stop), file=sys.stderr)
    except KeyboardInterrupt:
        config = stage["trained"]
        if config is None:
            print("convfactor finetune: interrupted before training started; nothing written", file=sys.stderr)
        else:
            print(f"convfactor finetune: interrupted while writing {args.output}; the trained model is in the "
                  f"checkpoint in {config.checkpoint.directory}; re-run the same command to write it",
                  file=sys.stderr)
    return 130


def _finetune(args, stage: dict) -> int:
    io.check_model_output(args.output, overwrite=args.overwrite)     # fail before any work
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    base = io.base_model_of(args.model)
    task, scale = task_and_scale(args, base)
    teacher_at = teacher_source(args, base)
    loss = args.loss or TASK_LOSS[task]
    config = finetune_config(args, loss, run_info(args, task, scale))
    with torch_threads(args.threads) as threads:
        print(plan_line(args, task, scale, config, threads), flush=True)
        start = resume_step(config)                                # a mismatch fails here, before the set-up
        if start is not None:
            print(f"resuming from the checkpoint at step {start} in {config.checkpoint.directory}", flush=True)
        model, example = load_model(args)
        teacher = load_teacher(args, teacher_at, example) if teacher_at else None
        check_fits_task(model, example, task, scale, teacher)
        data = training_set(task, args.data, scale=scale, sigma=args.sigma, patch_size=args.patch_size,
                            seed=args.seed, grey=example.shape[1] == 1)
        if task == "classification":
            check_classes(model, example, data, args.data)
        history: list = []
        finetune(model, data, config, teacher=teacher, history=history)
    stage["trained"] = config
    meta = {"model": base, "input_shape": list(example.shape), "task": task, "scale": scale,
            "weights_source": getattr(args, "weights_source", None),        # set by load_model where it knows
            "finetune": {"steps": args.steps, "data": args.data, "task": task, "loss": loss, "lr": args.lr,
                         "optimizer": args.optimizer, "schedule": args.schedule, "distill_from": args.distill_from,
                         "seed": args.seed, "final_loss": history[-1]["loss"] if history else None}}
    meta["finetune"].update({k: v for k, v in (("scale", scale), ("distill_weights", args.distill_weights)) if v})
    io.save(model, args.output, metadata={k: v for k, v in meta.items() if v is not None}, overwrite=args.overwrite)
    print(json.dumps(meta["finetune"], indent=1))
    print(f"wrote {args.output}")
    return 0

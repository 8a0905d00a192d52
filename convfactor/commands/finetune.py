"""convfactor finetune MODEL --data builtin|PATH -o OUT [--distill-from TEACHER] [--checkpoint-dir DIR] ...

A checkpoint records the run's settings: a re-run with the same ones resumes it, one with other
settings (a new ``--lr``, ``--optimizer``, data, ...) is refused, or with ``--overwrite`` starts fresh.
An existing, non-empty OUT is written into only with ``--overwrite`` (convfactor's own files replaced,
the others kept).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import io, models
from ..train.datasets import training_set
from ..train.finetune import CheckpointConfig, DistillConfig, FinetuneConfig, OptimizerConfig, finetune
from ..utils import torch_threads
from .common import add_model_arguments, load_model

HELP = ("fine-tune a (compressed) model: Adam/SGD with cosine/step schedules, optional distillation from "
        "the original, atomic checkpoints and resume")


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--data", default="builtin", help="'builtin' (the built-in training photos / patches) or a "
                                                     "folder (SR layouts, images, CIFAR-10 batches, ImageFolder)")
    p.add_argument("--task", choices=["sr", "denoise", "classification"],
                   help="default: the zoo model's task (from the compressed directory's base model)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--patch-size", type=int, help="training patch side (LR side for SR)")
    p.add_argument("--sigma", type=float, default=25.0, help="noise level for denoising (0-255 scale)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default="adam")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--step-size", type=int, help="steps between decays for --schedule step")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--loss", choices=["l1", "mse", "ce"], help="default: l1 (SR), mse (denoise), ce (classification)")
    p.add_argument("--distill-from", metavar="TEACHER",
                   help="a zoo model name (its shipped weights) or 'base': the compressed directory's base model "
                        "with its shipped weights")
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--task-weight", type=float, default=1.0, help="weight of the loss to the ground truth (0: pure distillation)")
    p.add_argument("--feature-layers", nargs="*", default=[], help="layer names for feature distillation")
    p.add_argument("--feature-weight", type=float, default=1.0)
    p.add_argument("--checkpoint-dir", help="checkpoints here (default: OUT.ckpt); an existing one is resumed")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("-o", "--output", required=True, help="output directory (convfactor format)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing OUT (convfactor's files replaced, others kept), and start fresh when "
                        "the checkpoint was written with other settings")


def _resolved(source: str) -> str:
    """A path as an absolute path (so a re-run from another directory is the same run), else as given."""
    return str(Path(source).resolve()) if Path(source).exists() else source


def run_info(args, task: str) -> dict:
    """What identifies a run besides :class:`FinetuneConfig`: recorded in and compared with its checkpoint."""
    return {"model": _resolved(args.model), "weights": _resolved(args.weights) if args.weights else None,
            "data": _resolved(args.data), "task": task, "distill_from": args.distill_from,
            "sigma": args.sigma if task == "denoise" else None, "patch_size": args.patch_size}


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


def _teacher(args, base: str | None):
    """The distillation teacher of ``--distill-from`` (with its shipped weights), or None."""
    if not args.distill_from:
        return None
    name = base if args.distill_from == "base" else args.distill_from
    if name is None:
        raise ValueError("--distill-from base needs a model whose base is a zoo model")
    return models.get(name, pretrained=True)


def run(args) -> int:
    io.check_model_output(args.output, overwrite=args.overwrite)     # fail before any work
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    with torch_threads(args.threads):
        model, example = load_model(args)
        base = io.base_model_of(args.model)
        info = models.info(base) if base in models.names() else {}
        task = args.task or info.get("task")
        if task not in ("sr", "denoise", "classification"):
            raise ValueError("cannot tell the task of this model; pass --task sr|denoise|classification")
        teacher = _teacher(args, base)
        data = training_set(task, args.data, scale=info.get("scale"), sigma=args.sigma, patch_size=args.patch_size,
                            seed=args.seed, grey=(info.get("input_shape", (1,))[0] == 1))
        if task == "classification":
            check_classes(model, example, data, args.data)
        loss = args.loss or {"sr": "l1", "denoise": "mse", "classification": "ce"}[task]
        history: list = []
        finetune(model, data, finetune_config(args, loss, run_info(args, task)), teacher=teacher, history=history)
    meta = {"model": base, "input_shape": list(example.shape),
            "finetune": {"steps": args.steps, "data": args.data, "task": task, "loss": loss, "lr": args.lr,
                         "optimizer": args.optimizer, "schedule": args.schedule, "distill_from": args.distill_from,
                         "seed": args.seed, "final_loss": history[-1]["loss"] if history else None}}
    io.save(model, args.output, metadata={k: v for k, v in meta.items() if v is not None}, overwrite=args.overwrite)
    print(json.dumps(meta["finetune"], indent=1))
    print(f"wrote {args.output}")
    return 0

#!/usr/bin/env python
"""Train the weights shipped in ``convfactor/weights/`` on the built-in training photos.

    python scripts/train_weights.py edsr_baseline_x2      # x2 super-resolution
    python scripts/train_weights.py dncnn                 # grey denoising, sigma = 25

Every setting is in ``RECIPES`` below and is written, with the measured held-out results, to
``convfactor/weights/NAME.json`` next to ``NAME.safetensors``.  Seeds are fixed and batches are a
function of (seed, step) (see :func:`convfactor.train.finetune.batch_for_step`), so a run killed
part-way resumes from its last checkpoint in ``--work`` and ends with the same weights.  Re-running
with the same torch version and thread count reproduces the weights (float summation order can
differ across CPUs/thread counts, so bit-identity is only claimed for one machine).

Initialization of EDSR ("interp_init"): :func:`convfactor.models.edsr.bilinear_init`, so the
network starts out computing bilinear x2 upsampling and training only has to learn the correction,
which is what makes CPU training of a couple of thousand iterations enough to beat bicubic clearly.
The architecture is unchanged.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from convfactor import models
from convfactor.data.images import builtin_images
from convfactor.files import atomic_write, check_writable
from convfactor.measure.quality import evaluate
from convfactor.models.edsr import bilinear_init
from convfactor.train.datasets import training_set
from convfactor.train.finetune import CheckpointConfig, FinetuneConfig, OptimizerConfig, finetune

ROOT = Path(__file__).resolve().parent.parent

RECIPES = {
    "edsr_baseline_x2": {
        "task": "sr", "scale": 2, "patch_size": 32, "length": 100_000, "augment": True, "data_seed": 0,
        "steps": 2000, "batch_size": 16, "optimizer": "adam", "lr": 4e-4, "schedule": "cosine", "warmup": 50,
        "min_lr_ratio": 0.02, "loss": "l1", "seed": 0, "init": "interp_init", "checkpoint_every": 100,
        # issue 15: the 2000-step weights, trained on for 4000 more steps (a fresh optimizer and cosine schedule)
        "stages": [{}, {"steps": 4000, "lr": 2e-4, "warmup": 50, "seed": 1, "data_seed": 1}],
    },
    "dncnn": {
        "task": "denoise", "sigma": 25, "patch_size": 40, "length": 100_000, "grey": True, "data_seed": 0,
        "steps": 200, "batch_size": 16, "optimizer": "adam", "lr": 1e-3, "schedule": "cosine", "warmup": 20,
        "min_lr_ratio": 0.02, "loss": "mse", "seed": 0, "init": "default", "checkpoint_every": 20,
        # a second stage, started from the first stage's final weights with a fresh optimizer and schedule
        "stages": [{}, {"steps": 300, "lr": 5e-4, "warmup": 0, "seed": 1, "data_seed": 1}],
    },
}


def build_data(recipe: dict):
    """The recipe's training patches of the built-in training photos."""
    return training_set(recipe["task"], scale=recipe.get("scale"), sigma=recipe.get("sigma", 25.0),
                        patch_size=recipe["patch_size"], length=recipe["length"], seed=recipe["data_seed"],
                        grey=recipe.get("grey", True))


def finetune_config(stage: dict, checkpoint_dir: Path, progress: bool, desc: str) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of one training stage of a recipe."""
    optimizer = OptimizerConfig(stage["optimizer"], lr=stage["lr"], schedule=stage["schedule"], warmup=stage["warmup"],
                                min_lr_ratio=stage["min_lr_ratio"])
    checkpoint = CheckpointConfig(checkpoint_dir, every=stage["checkpoint_every"])
    return FinetuneConfig(steps=stage["steps"], batch_size=stage["batch_size"], loss=stage["loss"], seed=stage["seed"],
                          optimizer=optimizer, checkpoint=checkpoint, progress=progress, desc=desc)


def first_stage_from(shipped_json: Path, recipe: dict) -> bool:
    """Whether the shipped weights are exactly ``recipe``'s first stage (its recorded recipe matches).

    Then ``--from-shipped`` starts at stage 2 from them instead of re-training stage 1."""
    if not shipped_json.is_file():
        return False
    recorded = json.loads(shipped_json.read_text()).get("recipe", {})
    # weights of a multi-stage run record their stages: not stage 1
    return recorded == models.training_stages(recipe)[0]


def train(name: str, recipe: dict, work: Path, progress: bool, history: list,
          from_shipped: bool = False) -> torch.nn.Module:
    """``name`` trained by ``recipe`` (each stage from the last one's weights, a fresh optimizer).

    ``from_shipped``: stage 1 is the shipped weights (checked by :func:`first_stage_from`)."""
    torch.manual_seed(recipe["seed"])
    model = models.get(name, pretrained=from_shipped).train()
    if recipe["init"] == "interp_init" and not from_shipped:
        bilinear_init(model)
    for k, stage in enumerate(models.training_stages(recipe)):
        if from_shipped and k == 0:
            continue
        desc = f"train {name}" + (f" (stage {k + 1})" if k else "")
        finetune(model, build_data(stage), finetune_config(stage, work if k == 0 else work / f"stage{k + 1}",
                                                           progress, desc), history=history)
        model.train()
    return model


def write_weights(model: torch.nn.Module, name: str, recipe: dict, out_dir: Path) -> None:
    """``out_dir/NAME.safetensors``, atomically, world-readable (package data)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = out_dir / f".{name}.safetensors.tmp"
    save_file(state, str(tmp), metadata={"model": name, "recipe": json.dumps(recipe)})
    tmp.chmod(0o644)                     # package data: world-readable (temporary files are 0600)
    tmp.replace(out_dir / f"{name}.safetensors")
    print(f"wrote {out_dir / name}.safetensors", flush=True)


def held_out(model: torch.nn.Module, recipe: dict, progress: bool) -> dict:
    """PSNR/SSIM of ``model`` and of the baseline on the held-out built-in photos (full images)."""
    options = {"scale": recipe["scale"]} if recipe["task"] == "sr" else {"sigma": recipe["sigma"],
                                                                          "grey": recipe.get("grey", True)}
    return evaluate(model, recipe["task"], builtin_images("test"), progress=progress, **options)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(RECIPES))
    p.add_argument("--steps", type=int, help="override the recipe's steps (then the result is not the shipped recipe)")
    p.add_argument("--work", help="checkpoint directory (default: runs/train-NAME)")
    p.add_argument("--out", default=str(ROOT / "convfactor" / "weights"), help="where NAME.safetensors/.json go")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--eval-only", action="store_true", help="only (re-)measure the shipped weights and rewrite the JSON")
    p.add_argument("--from-shipped", action="store_true",
                   help="take the shipped weights as stage 1 (only when their recorded recipe is stage 1's)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    recipe = dict(RECIPES[args.name])
    if args.steps is not None:
        recipe["steps"] = args.steps
    out_dir = Path(args.out)
    check_writable(out_dir / f"{args.name}.safetensors")
    if args.from_shipped and not first_stage_from(models.WEIGHTS_DIR / f"{args.name}.json", recipe):
        p.error(f"--from-shipped: the shipped {args.name} weights were not trained by this recipe's first stage")
    work = Path(args.work or ROOT / "runs" / f"train-{args.name}")
    work.mkdir(parents=True, exist_ok=True)

    history: list = []
    train_s = None
    if args.eval_only:
        model = models.get(args.name, pretrained=True)
    else:
        t0 = time.time()
        model = train(args.name, recipe, work, not args.no_progress, history, args.from_shipped)
        train_s = time.time() - t0
        total_steps = sum(stage["steps"] for stage in models.training_stages(recipe))
        print(f"trained {total_steps} steps ({len(history)} in this process) in {train_s:.0f} s", flush=True)
        write_weights(model, args.name, recipe, out_dir)
        with open(work / "history.jsonl", "a") as f:
            for h in history:
                f.write(json.dumps(h) + "\n")

    results = held_out(model, recipe, not args.no_progress)
    print(json.dumps({k: v for k, v in results.items() if k != "images"}, indent=1), flush=True)
    previous = json.loads((out_dir / f"{args.name}.json").read_text()) if (out_dir / f"{args.name}.json").is_file() else {}
    meta = {"model": args.name, "recipe": recipe, "script": "scripts/train_weights.py",
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "train_seconds_this_process": round(train_s, 1) if train_s is not None else
            previous.get("train_seconds_this_process"),
            "stage_1_from_shipped_weights": bool(args.from_shipped),
            "steps_this_process": len(history) if train_s is not None else previous.get("steps_this_process"),
            "final_loss": history[-1]["loss"] if history else previous.get("final_loss"),
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "threads": args.threads, "machine": platform.machine()},
            "held_out": results}
    atomic_write(out_dir / f"{args.name}.json", json.dumps(meta, indent=1))
    (out_dir / f"{args.name}.json").chmod(0o644)
    print(f"wrote {out_dir / args.name}.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

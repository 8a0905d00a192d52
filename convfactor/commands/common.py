"""Argument helpers shared by the CLI commands."""
from __future__ import annotations

import argparse
import importlib

import torch
from torch import nn


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a built-in model name (e.g. resnet20, edsr_baseline_x2), 'package.module:factory', "
                                 "or a directory written by 'convfactor compress'")
    p.add_argument("--weights", help="weights to load: .safetensors, a plain state dict (.pt/.pth) or a convfactor directory")
    p.add_argument("--pretrained", action="store_true", help="load the shipped weights of a built-in model")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled full model (runs code from the file)")
    p.add_argument("--input-size", help="example input shape, e.g. 1x3x256x256 (default: the model's own)")


def add_malloc_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--malloc", choices=["retain", "default"], default="retain",
                   help="CPU allocator for timing: 'retain' reuses freed activations instead of re-faulting them in "
                        "(like preloading jemalloc; see convfactor.measure.allocator), 'default' leaves glibc as it "
                        "is; recorded with every figure (default: retain)")


def apply_malloc(args) -> None:
    """Set the allocator mode the command's timings run under (both models of every comparison alike)."""
    from ..measure.allocator import set_malloc
    set_malloc(getattr(args, "malloc", "retain"))


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise ValueError(f"--input-size must look like 1x3x256x256, got {text!r}") from None
    if not shape or any(v <= 0 for v in shape):
        raise ValueError(f"--input-size must be positive, got {text!r}")
    return shape


def build_model(name: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """A model from a zoo name or ``package.module:factory``; also its default input shape."""
    from .. import models
    if ":" in name:
        module_name, factory = name.split(":", 1)
        model = getattr(importlib.import_module(module_name), factory)()
        return model, None
    return models.get(name), (1, *models.info(name)["input_shape"])


def load_model(args) -> tuple[nn.Module, torch.Tensor]:
    """The model the arguments describe, with weights, and an example input (seeded)."""
    from pathlib import Path
    from .. import io, models
    source = Path(args.model)
    if source.is_dir() and (source / "recipe.json").is_file():
        import json
        meta = json.loads((source / "recipe.json").read_text()).get("metadata", {})
        if "model" not in meta:
            raise ValueError(f"{source} does not record its base model; pass it as MODEL with --weights {source}")
        base, shape = build_model(meta["model"])
        model = io.load(source, base)
    else:
        model, shape = build_model(args.model)
        if getattr(args, "pretrained", False):
            model = models.get(args.model, pretrained=True)
        if args.weights:
            io.load_weights(model, args.weights, trust_pickle=args.trust_pickle) if not Path(args.weights).is_dir() \
                else None
            if Path(args.weights).is_dir():
                model = io.load(args.weights, model)
    if args.input_size:
        shape = parse_shape(args.input_size)
    if shape is None:
        raise ValueError("--input-size is needed for a model given as package.module:factory")
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return model.eval(), example

"""Argument helpers shared by the CLI commands."""
from __future__ import annotations

import argparse

import torch
from torch import nn


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a built-in model name (e.g. resnet20, edsr_baseline_x2), torchvision:NAME, timm:NAME "
                                 "(random init, seeded; load your weights with --weights), spandrel:PATH (a checkpoint "
                                 "spandrel recognizes, with its weights, scale and channels), 'package.module:factory', "
                                 "or a directory written by 'convfactor compress'")
    p.add_argument("--weights", help="weights to load: .safetensors, a plain state dict (.pt/.pth) or a convfactor directory")
    p.add_argument("--pretrained", action="store_true",
                   help="load the shipped weights of a built-in model (the default for a model that has them)")
    p.add_argument("--random-init", action="store_true",
                   help="a built-in model with its seeded random initialisation instead of its shipped weights")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled full model (runs code from the file)")
    p.add_argument("--input-size", help="example input shape, e.g. 1x3x256x256 (default: the model's own)")


def backend_argument(text: str) -> str:
    """argparse ``type`` for a timing back-end, ``name`` or ``name:key=value`` (``openvino:precision=bf16``):
    checked against the back-end registry, so the CLI's choices are the registry's."""
    from ..measure.backends import check_backend_name
    try:
        check_backend_name(text)
    except (ValueError, KeyError) as exc:
        raise argparse.ArgumentTypeError(str(exc.args[0] if exc.args else exc)) from None
    return text


def backend_help(what: str) -> str:
    """The ``--backend`` help text, listing the registered back-ends and their precisions."""
    from ..measure.backends import BACKENDS, backend_class
    names = ", ".join(f"{n} ({'/'.join(backend_class(n).precisions)})" for n in BACKENDS)
    return f"{what}: one of {names}; a precision as NAME:precision=P (e.g. openvino:precision=bf16)"


def add_malloc_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--malloc", choices=["auto", "retain", "default"], default="auto",
                   help="CPU allocator for timing: 'auto' re-runs the command with tcmalloc (else jemalloc) preloaded "
                        "when one is installed, else 'retain'; 'retain' reuses freed activations instead of "
                        "re-faulting them in (mallopt); 'default' leaves glibc as it is. Recorded with every figure "
                        "(default: auto; see convfactor.measure.allocator)")


def apply_malloc(args) -> None:
    """Set the allocator mode the command's timings run under (both models of every comparison alike);
    ``auto`` keeps a preloaded jemalloc/tcmalloc (see :func:`convfactor.cli.main`), else retains."""
    from ..measure.allocator import set_malloc
    set_malloc(getattr(args, "malloc", "auto"))


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise ValueError(f"--input-size must look like 1x3x256x256, got {text!r}") from None
    if not shape or any(v <= 0 for v in shape):
        raise ValueError(f"--input-size must be positive, got {text!r}")
    return shape


def build_model(name: str, pretrained: bool = False) -> tuple[nn.Module, tuple[int, ...] | None]:
    """The model of a zoo name or a spec (``torchvision:NAME``, ``timm:NAME``, ``spandrel:PATH``,
    ``package.module:factory``; see :func:`convfactor.models.get`), and its default input shape with a batch
    axis (None if unknown; a spandrel checkpoint's input channels are spandrel's reading of the file)."""
    from .. import models
    model = models.get(name, pretrained=pretrained)
    shape = models.info(name)["input_shape"]
    return model, (1, *shape) if shape else None


def use_shipped_weights(args) -> bool:
    """Whether a built-in model is built with its shipped weights: by default when it has them and neither
    ``--weights`` nor ``--random-init`` is given.  ``--pretrained`` with ``--random-init`` is one ValueError."""
    from .. import models
    random_init, asked = getattr(args, "random_init", False), getattr(args, "pretrained", False)
    if random_init and asked:
        raise ValueError("--pretrained and --random-init contradict each other; pass one")
    if random_init or args.weights:
        return bool(asked) and not random_init
    return args.model in models.pretrained_names() or bool(asked)


def random_weights_note(args, pretrained: bool) -> str | None:
    """The stderr note for a built-in, torchvision or timm model left with random weights although the user
    did not ask for them (no shipped weights, no ``--weights``); None otherwise (a ``package.module:factory``
    may load its own weights)."""
    from .. import models
    if pretrained or args.weights or getattr(args, "random_init", False):
        return None
    if args.model in models.names() or args.model.split(":")[0] in models.thirdparty.LIBRARIES:
        return (f"note: {args.model} has no shipped weights: random initialisation (seed 0); load yours with "
                "--weights FILE")
    return None


def weights_source(name: str, weights: str | None, pretrained: bool) -> str | None:
    """Where a model's weights came from, recorded with what is made from it (``shipped:NAME@sha256=...``,
    ``file:PATH@sha256=...``, ``random-init:seed=0``); None for a spandrel checkpoint, whose recorded
    base model already pins its file and sha256."""
    from pathlib import Path
    from .. import models
    from ..files import file_sha256
    if weights:
        path = Path(weights).resolve()
        return f"file:{path}" + (f"@sha256={file_sha256(path)}" if path.is_file() else "")
    if name.startswith("spandrel:"):
        return None
    shipped = models.WEIGHTS_DIR / f"{name}.safetensors"
    if pretrained and shipped.is_file():
        return f"shipped:{name}@sha256={file_sha256(shipped)}"
    return f"shipped:{name}" if pretrained else "random-init:seed=0"


def load_model(args) -> tuple[nn.Module, torch.Tensor]:
    """The model the arguments describe, with weights, and an example input (seeded)."""
    from pathlib import Path
    from .. import io, models
    source, note = Path(args.model), None
    if source.is_dir() and (source / "recipe.json").is_file():
        import json
        name = io.base_model_of(source)
        if name is None:
            raise ValueError(f"{source} does not record its base model; pass it as MODEL with --weights {source}")
        base, shape = build_model(name)
        model = io.load(source, base)
        meta = json.loads((source / "recipe.json").read_text()).get("metadata") or {}
        args.weights_source = meta.get("weights_source") or f"compressed:{source.resolve()}"
        shape = tuple(meta.get("input_shape") or ()) or shape
    else:
        pretrained = use_shipped_weights(args)
        model, shape = build_model(args.model, pretrained=pretrained)
        if args.weights and Path(args.weights).is_dir():
            model = io.load(args.weights, model)
        elif args.weights:
            io.load_weights(model, args.weights, trust_pickle=args.trust_pickle)
        args.weights_source = weights_source(args.model, args.weights, pretrained)
        note = random_weights_note(args, pretrained)
    if args.input_size:
        shape = parse_shape(args.input_size)
    if shape is None:
        raise ValueError(f"--input-size is needed for {args.model} (its library states no input size)")
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    models.check_input(model, example)
    if note:
        import sys
        print(note, file=sys.stderr)
    return model.eval(), example

"""convfactor compress MODEL (--method M (--rank|--macs-ratio|--energy) | --rules FILE | --plan FILE) -o OUT.

OUT is a directory (model.safetensors, recipe.json, report.*).  An existing, non-empty OUT is written
into only with ``--overwrite``, and then only convfactor's own files there are replaced.  With
``--method``, the image-facing convs (<= 4 input or output channels) stay dense, each reported with the
reason, unless ``--include-image-layers`` is given (``--rules`` and ``--plan`` say for themselves).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..compression.surgery import parse_rules
from ..methods import registry
from ..rank import Plan
from .common import add_model_arguments, load_model

HELP = "factorize a model's conv/linear layers and write the result (safetensors + JSON recipe) atomically"


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--method", help="factorization method (channel_svd, spatial_svd, tucker2, cp, depthwise, ...), "
                                    "configured as NAME:key=value,... (e.g. sliced_svd:slices=4)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--rank", type=rank_argument, help="rank (or r1,r2 for two-rank methods)")
    target.add_argument("--macs-ratio", type=float, help="per-layer MACs after / before, in (0, 1]")
    target.add_argument("--energy", type=float, help="fraction of squared singular values kept, in (0, 1]")
    p.add_argument("--op-types", nargs="*", default=["Conv2d"], help="layer types to select (default: Conv2d)")
    p.add_argument("--op-names", nargs="*", help="glob patterns of layer names to select")
    p.add_argument("--exclude", nargs="*", default=[], help="glob patterns of layer names to leave alone")
    p.add_argument("--include-image-layers", action="store_true",
                   help="also factorize the image-facing convs (<= 4 input or output channels: the ones reading or "
                        "writing RGB/grey pixels), which --method leaves dense by default, as the demo's "
                        "pipeline does (a low rank there loses colour no later layer restores)")
    p.add_argument("--rules", help="a JSON/YAML file with a list of NNI-style rules (overrides --method etc.)")
    p.add_argument("--plan", help="a plan file written by 'convfactor plan'")
    p.add_argument("--accept-unreachable", action="store_true",
                   help="apply a plan that measured below its speed-up request (refused by default: its deep cuts "
                        "lose much quality for a speed-up nobody asked for)")
    p.add_argument("--fit", choices=["weights", "data"], default="weights",
                   help="weights: each factorized layer fitted to its kernel (default); data: to the original's "
                        "responses on crops of the built-in training photos shaped like the input (values in [0, 1]; "
                        "LR crops for an SR model), layer by layer on what the compressed layers before it give: much "
                        "better without fine-tuning (for a model that wants other inputs, use the API's calibration=)")
    p.add_argument("--calibration-crops", type=int, default=8, help="with --fit data: how many crops (default 8)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--no-merge", action="store_true",
                   help="keep each factorized layer as its method built it: no exact merging of adjacent linear "
                        "layers afterwards (by default a merge is made where it lowers the MACs)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing OUT: replace the files convfactor writes there, keep the others")


def rank_argument(text: str) -> int | tuple[int, ...]:
    """argparse ``type`` of ``--rank``: ``8`` -> 8, ``8,16`` -> (8, 16)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rank is an int, or ints separated by commas (8 or 8,16), got {text!r}") \
            from None
    return values if len(values) > 1 else values[0]


def rules_from_args(args) -> list[dict]:
    if args.rules:
        return read_rules(args.rules)
    if not args.method:
        raise ValueError("give --method with one of --rank/--macs-ratio/--energy, or --rules, or --plan")
    registry.parse(args.method)             # "name:key=value" checked as plan checks it, in the same words
    target = {"rank": args.rank} if args.rank is not None else (
        {"macs_ratio": args.macs_ratio} if args.macs_ratio is not None else
        {"energy": args.energy} if args.energy is not None else None)
    if target is None:
        raise ValueError("give one of --rank, --macs-ratio, --energy")
    rule = {"op_types": args.op_types, "method": args.method, **target}
    if args.op_names:
        rule["op_names"] = args.op_names
    if args.exclude:
        rule["exclude_op_names"] = args.exclude
    return [rule]


def read_rules(path) -> list[dict]:
    """The rules of a YAML/JSON rules file: a list of mappings (a malformed file is one error line)."""
    from ..files import read_structured
    rules = read_structured(path, "rules file")
    if isinstance(rules, dict) and isinstance(rules.get("rules"), list):
        rules = rules["rules"]
    if not isinstance(rules, list) or not rules or not all(isinstance(r, dict) for r in rules):
        raise ValueError(f"rules file {path} must hold a non-empty list of rules (mappings such as "
                         f"{{op_types: [Conv2d], method: channel_svd, macs_ratio: 0.5}}), got {type(rules).__name__}")
    return rules


def run(args) -> int:
    from .. import io
    from ..compression.api import compress
    io.check_model_output(args.output, overwrite=args.overwrite)     # fail before any work
    plan = Plan.load(args.plan) if args.plan else None
    rules = None if plan is not None else rules_from_args(args)                # bad files fail before work too
    if rules is not None:
        parse_rules(rules)                                                      # and so do bad rules in them
    model, example = load_model(args)
    calibration = photo_calibration(args, example) if args.fit == "data" else None
    if plan is not None:
        plan.check_weights(getattr(args, "weights_source", None))
        if plan.summary.message:
            print(f"WARNING: the plan {args.plan} says: {plan.summary.message}")
        compressed, report = _apply_plan(plan, model, example, merge=not args.no_merge,
                                         allow_unreachable=args.accept_unreachable, calibration=calibration)
    else:
        keep = {} if args.rules or args.include_image_layers else image_facing(model, example)
        if calibration is not None:
            rules = [{"data_aware": True, **rule} for rule in rules]
        compressed, report = compress(model, rules, example, progress=True, merge=not args.no_merge, keep_dense=keep,
                                      calibration=calibration)
    meta = {"model": args.model if ":" in args.model or not Path(args.model).exists() else None,
            "input_shape": list(example.shape), "weights_source": getattr(args, "weights_source", None)}
    io.save(compressed, args.output, metadata={k: v for k, v in meta.items() if v is not None},
            overwrite=args.overwrite)
    from ..measure.report_data import collect
    from ..report import write_report
    write_report(args.output, collect(model, compressed, example, compression_report=report,
                                      model_name=args.model, title=f"convfactor compress {args.model}"))
    print(report.table())                     # ends with "warning: nothing was compressed ..." when so
    print(f"wrote {args.output}")
    return 0


def image_facing(model, example) -> dict[str, str]:
    """``{name: reason}`` of the image-facing convs (:func:`convfactor.recipes.pipeline.image_layers`: few
    channels, or reading the input / writing the output through no other conv), which ``--method``
    leaves dense unless ``--include-image-layers``."""
    from ..recipes.pipeline import image_layers
    out = {}
    for name in image_layers(model, example):
        conv = model.get_submodule(name)
        out[name] = (f"image-facing ({conv.in_channels}->{conv.out_channels} channels, reading or writing the image: a "
                     "low rank here loses colour no later layer restores); kept dense, --include-image-layers "
                     "factorizes it")
    return out


def _apply_plan(plan: Plan, model, example, *, merge: bool, allow_unreachable: bool = False, calibration=None):
    """``plan.apply`` (which merges, as :func:`compress` does by default); without ``merge``, the plan's
    model and reachability checks and then ``compress(..., merge=False)`` on its rules.  ``calibration``:
    fit to the data (see :meth:`Plan.apply`)."""
    from ..compression.api import compress
    if merge or not plan.compressed:
        return plan.apply(model, example, allow_unreachable=allow_unreachable, calibration=calibration)
    plan.check_model(model)
    if plan.shortfall() and not allow_unreachable:
        raise ValueError(f"{plan.shortfall()}; plan for a smaller speed-up, or pass --accept-unreachable")
    return compress(model, plan.rules(data_aware=calibration is not None), example, progress=True, merge=False,
                    calibration=calibration)


def photo_calibration(args, example) -> list:
    """``--calibration-crops`` centre crops of the built-in training photos, shaped like ``example`` (its
    channels: RGB, or grey as the mean; its spatial size, at most 64 px a side), LR crops (bicubic) for
    an SR model whose scale is known: model inputs for the data-aware fit."""
    from .. import models
    from ..data.images import builtin_images
    from ..data.sr import calibration_crops
    import torch
    if example.dim() != 4 or example.shape[1] not in (1, 3):
        raise ValueError(f"--fit data makes image crops; this model's input {tuple(example.shape)} is not an image "
                         "batch (use the API's calibration= with your own inputs)")
    if args.calibration_crops < 1:
        raise ValueError(f"--calibration-crops must be >= 1, got {args.calibration_crops}")
    try:
        scale = models.info(args.model).get("scale") or 1
    except (ValueError, KeyError, ImportError):
        scale = 1
    side = min(64, *example.shape[2:])
    crops = calibration_crops(builtin_images("train"), scale, side, limit=args.calibration_crops)
    out = [torch.from_numpy(c) for c in crops]
    return [c.mean(1, keepdim=True) if example.shape[1] == 1 else c for c in out]

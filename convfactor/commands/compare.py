"""convfactor compare ORIGINAL COMPRESSED [--backend torch onnxruntime compile] [--target 2x] [--input-size 1x3x256x256].

Times two models side by side on each timing back-end (each against that back-end's own fastest
form of the original), with a 95% interval per speed-up and the reasons a figure is noisy.  The
library call behind it is :func:`convfactor.measure.compare.compare_speed`.
"""
from __future__ import annotations

import argparse

from ..measure.allocator import malloc_description
from ..measure.compare import compare_speed
from ..rank import Target
from .common import add_malloc_argument, apply_malloc, backend_argument, backend_help, load_model

HELP = "time an original and a compressed model side by side on each back-end (speed-up with its interval)"


def add_arguments(p) -> None:
    add_malloc_argument(p)
    p.add_argument("original", help="the original model (a built-in name, torchvision:NAME, package.module:factory, ...)")
    p.add_argument("compressed", help="a directory written by 'convfactor compress' (or another model spec)")
    p.add_argument("--weights", help="the original's weights (.safetensors or a plain state dict)")
    p.add_argument("--pretrained", action="store_true", help="the original with its shipped weights")
    p.add_argument("--input-size", help="example input shape, e.g. 1x3x256x256 (default: the recorded one)")
    p.add_argument("--backend", nargs="+", default=["torch"], type=backend_argument,
                   help=backend_help("timing back-ends, side by side (default: torch)"))
    p.add_argument("--target", type=speedup_argument,
                   help="a requested speed-up (2x, or speedup=2x): each back-end's figure is then judged against it "
                        "by its 95%% interval (without one, no verdict about a target is printed)")
    p.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime threads (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds at least (default 3)")
    p.add_argument("--max-rounds", type=int, default=12,
                   help="more rounds, up to this many, until the 95%% interval is within +-5%% (default 12)")


def speedup_argument(text: str) -> float:
    """argparse ``type`` of ``--target``: ``2x``, ``2`` or ``speedup=2x`` -> 2.0 (read by :class:`Target`)."""
    try:
        target = Target.parse(text if "=" in text else f"speedup={text}")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if target.kind != "speedup" or not target.value > 0:
        raise argparse.ArgumentTypeError(f"a speed-up request looks like 2x (or speedup=2x), got {text!r}")
    return target.value


def _load(spec: str, args, weights: str | None = None, pretrained: bool = False):
    ns = argparse.Namespace(model=spec, weights=weights, pretrained=pretrained, trust_pickle=False,
                            input_size=args.input_size)
    return load_model(ns)


def run(args) -> int:
    apply_malloc(args)
    if args.max_rounds < args.rounds or args.rounds < 1:
        raise ValueError("--rounds must be >= 1 and --max-rounds >= --rounds")
    compressed, example = _load(args.compressed, args)
    original, _ = _load(args.original, args, args.weights, args.pretrained)
    print(f"input {tuple(example.shape)}, {args.threads} threads, allocator: {malloc_description()}")
    for backend in args.backend:
        res = compare_speed(original, compressed, example, threads=args.threads, backend=backend,
                            rounds=args.rounds, max_rounds=args.max_rounds, repeats=3 * args.rounds)
        print(f"{backend:12s} {res.summary()}")
        verdict = res.verdict(args.target or 1.0)
        if args.target is not None or verdict.kind == "slower":        # no verdict about a target not given
            print(f"{'':12s} {verdict.line}")
    return 0

"""convfactor inspect MODEL: per-layer shapes, params, MACs, condition numbers and energy ranks."""
from __future__ import annotations

import json

from .common import add_model_arguments, load_model

HELP = "print per-layer shape, params, MACs, condition number and the ranks keeping 90/99%% energy"


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    from ..compression.inspect import format_facts, inspect_model
    model, example = load_model(args)
    facts = inspect_model(model, example)
    if args.json:
        print(json.dumps([{k: v for k, v in f.items() if k != "singular_values"} for f in facts], indent=2))
    else:
        print(f"model: {args.model}   input: {'x'.join(map(str, example.shape))}")
        print(format_facts(facts))
    return 0

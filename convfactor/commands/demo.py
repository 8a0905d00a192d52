"""convfactor demo: the main job on the built-in default (interim: inspect + compress EDSR-baseline x2)."""
from __future__ import annotations

HELP = "run the built-in demo (inspect and compress a built-in model)"


def add_arguments(p) -> None:
    p.add_argument("--model", default="edsr_baseline_x2")
    p.add_argument("--method", default="channel_svd")
    p.add_argument("--macs-ratio", type=float, default=0.5)
    p.add_argument("-o", "--output", default="convfactor-demo")


def run(args) -> int:
    import torch
    from .. import models
    from ..core.api import compress
    from ..core.inspect import format_facts, inspect_model
    from ..io import save
    model = models.get(args.model)
    example = models.default_input(args.model)
    print(format_facts(inspect_model(model, example)))
    compressed, report = compress(model, [{"op_types": ["Conv2d"], "method": args.method, "macs_ratio": args.macs_ratio}],
                                  example, progress=True)
    print(report.table())
    save(compressed, args.output, metadata={"model": args.model})
    print(f"wrote {args.output}")
    return 0

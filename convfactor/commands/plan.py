"""convfactor plan MODEL --target macs=40% | params=25% | speedup=3x | error=0.2 --criterion ... -o plan.yaml"""
from __future__ import annotations

from pathlib import Path

from ..files import check_output
from ..rank import LatencyConfig, RankConfig, Target, plan
from ..rank.planner import CRITERIA
from .common import add_malloc_argument, add_model_arguments, apply_malloc, backend_argument, backend_help, load_model

HELP = ("choose per-layer methods and ranks for a target (MACs/params budget, energy, VBMF, or a measured "
        "speed-up) and write an editable plan file for 'compress --plan'")


def add_arguments(p) -> None:
    add_malloc_argument(p)
    add_model_arguments(p)
    p.add_argument("--target", help="macs=40%%, params=3x, speedup=3x, error=0.2, energy=0.9 or rank=8")
    p.add_argument("--criterion", choices=list(CRITERIA),
                   help="how ranks are chosen (default: from the target; vbmf without one)")
    p.add_argument("--method", action="append", dest="methods",
                   help="factorization method(s) to consider (repeatable; the latency planner tries several)")
    p.add_argument("--op-names", nargs="*", help="glob patterns of layer names to consider")
    p.add_argument("--exclude", nargs="*", default=[], help="glob patterns of layer names to leave dense")
    p.add_argument("--round-to", type=int, help="round ranks to a multiple of this (e.g. 8 or 16)")
    p.add_argument("--energy", type=float, default=0.9, help="energy kept for --criterion energy (default 0.9)")
    p.add_argument("--weakening", type=float, default=1.0,
                   help="VBMF weakening w in [0, 1]: r = R - w (R - r_vbmf) (default 1: plain EVBMF)")
    p.add_argument("--kappa-threshold", type=float,
                   help="decompose only layers whose condition number exceeds this")
    p.add_argument("--threads", type=int, help="threads for latency measurement (default: torch's)")
    p.add_argument("--formats", nargs="*", default=["contiguous", "channels_last"],
                   help="memory formats the latency planner may use")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per layer candidate (default 10)")
    p.add_argument("--cache", default="auto",
                   help="a JSON file caching layer timings across runs (default: ~/.cache/convfactor/latency.json, "
                        "or $CONVFACTOR_CACHE_DIR; 'none' keeps them in memory)")
    p.add_argument("--backend", type=backend_argument, default="torch",
                   help=backend_help("timing back-end the latency planner measures on (default: torch, eager)"))
    p.add_argument("-o", "--output", required=True, help="plan file to write (.yaml/.yml or .json)")
    p.add_argument("--overwrite", action="store_true", help="replace the plan file if it exists")


def run(args) -> int:
    apply_malloc(args)
    out = Path(args.output)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"directory {out.parent} does not exist")
    check_output(out, overwrite=args.overwrite)                      # before any work
    target = Target.parse(args.target)
    config = RankConfig(round_to=args.round_to, kappa_threshold=args.kappa_threshold, energy=args.energy,
                        weakening=args.weakening)
    timing = LatencyConfig(threads=args.threads, formats=tuple(args.formats), repeats=args.repeats,
                           cache=None if args.cache == "none" else args.cache, backend=args.backend)
    model, example = load_model(args)
    p = plan(model, example, target=target, criterion=args.criterion, methods=args.methods, op_names=args.op_names,
             exclude=args.exclude, config=config, latency=timing,
             model_name=args.model if not Path(args.model).exists() else None, progress=True)
    p.weights = getattr(args, "weights_source", None)
    p.save(out, overwrite=args.overwrite)
    print(p.table())
    if p.summary.message:
        print(f"WARNING: {p.summary.message}")
    print(f"wrote {out}")
    return 0

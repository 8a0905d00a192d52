"""convfactor report RUN_DIR: (re)write report.md and a self-contained report.html from a run directory.

It re-renders the report files convfactor wrote there (report.json beside them says so); a report.md
or report.html of someone else's (no report.json) is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import io, report
from ..measure.report_data import collect
from .common import build_model

HELP = "write report.json / report.md / report.html (with figures) for a run directory"


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="a directory holding report.json (e.g. written by 'convfactor compress')")
    p.add_argument("--measure", action="store_true",
                   help="also time the original and the compressed model (needs the run's recipe.json and its "
                        "base model; the speed-up is against the original's fastest form)")
    p.add_argument("--weights", default=None,
                   help="the original model's weights (as given to 'convfactor compress'); needed for the singular "
                        "spectra and condition numbers of the original layers")
    p.add_argument("--threads", type=int, default=None, help="threads for --measure (default: torch's current)")
    p.add_argument("--kappa-threshold", type=float, default=None, help="condition-number threshold drawn in the figure")
    p.add_argument("--title", default=None)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report.md / report.html in RUN_DIR that convfactor did not write")


def check_report_files(run_dir: Path, overwrite: bool) -> None:
    """Refuse (before any work) to replace report files that convfactor did not write: they are its
    own when the report.json it writes with them is there."""
    if overwrite or (run_dir / "report.json").is_file():
        return
    foreign = [name for name in ("report.md", "report.html") if (run_dir / name).exists()]
    if foreign:
        raise FileExistsError(f"{run_dir / foreign[0]} exists and was not written by convfactor (no report.json "
                              f"beside it); pass --overwrite to replace it")


def run(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory")
    check_report_files(run_dir, args.overwrite)
    data_file = run_dir / "report.json"
    data = json.loads(data_file.read_text()) if data_file.is_file() else {}
    recipe_file = run_dir / "recipe.json"
    if recipe_file.is_file():
        meta = json.loads(recipe_file.read_text()).get("metadata") or {}
        name = io.base_model_of(run_dir)
        if name is not None:          # a 'convfactor compress' directory: enrich with spectra (and timings)
            base, shape = build_model(name)
            compressed = io.load(run_dir, base)
            if args.weights:
                io.load_weights(base, args.weights)
            shape = tuple(meta.get("input_shape") or shape)
            example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
            fresh = collect(base, compressed, example, compression_report=data if data.get("layers") else None,
                            measure=args.measure, threads=args.threads, kappa_threshold=args.kappa_threshold,
                            model_name=name, spectra=bool(args.weights))
            data = {**data, **{k: v for k, v in fresh.items() if k not in data or k in ("spectra", "speed", "latency")}}
            if not args.weights and "spectra" not in data:
                print("note: no --weights given, so no singular spectra (the original's trained kernels are not "
                      "stored in the run directory)")
    if not data:
        raise FileNotFoundError(f"{run_dir} has neither report.json nor a recipe.json naming its model")
    if args.title:
        data["title"] = args.title
    if args.kappa_threshold is not None:
        data["kappa_threshold"] = args.kappa_threshold
    paths = report.write_report(run_dir, data)
    for key in ("json", "md", "html"):
        print(f"wrote {paths[key]}")
    return 0

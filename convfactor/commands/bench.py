"""convfactor bench [-o BENCHMARKS.md] [--quick] [--sections a b ...] [--update] [--experiment NAME].

The sections live outside the installed package, in the checkout's top-level ``benchmarks/``
folder (they need the optional peers and are not part of the library). This command finds that
folder beside the package it was imported from and hands the parsed arguments to its runner.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from .common import add_malloc_argument

HELP = "run the benchmark sections (the checkout's benchmarks/) and write BENCHMARKS.md atomically"


def add_arguments(p) -> None:
    add_malloc_argument(p)
    p.add_argument("-o", "--output", default=None, help="Markdown file to write (default: print to stdout)")
    p.add_argument("--quick", action="store_true", help="the seconds-long smoke configuration of every section")
    p.add_argument("--sections", nargs="*", default=None, help="section names to run (default: all that exist)")
    p.add_argument("--update", action="store_true",
                   help="re-run only --sections and replace them in the existing -o file, keeping the other sections")
    p.add_argument("--experiment", default=None,
                   help="run one of the seeds' headline experiments (see 'convfactor bench --list')")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every timing (default: 2)")
    p.add_argument("--backend", dest="backends", action="append", choices=["torch", "compile", "onnxruntime"],
                   help="timing back-end (repeatable) for the sections that take one (e.g. runtimes: plan and "
                        "time on each); without --sections, runs those sections only")
    p.add_argument("--list", action="store_true", help="list the sections and experiments, then exit")


def checkout_root() -> Path:
    """The source checkout holding ``benchmarks/`` next to this package (an editable install)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "runner.py").is_file():
        raise FileNotFoundError("convfactor bench runs from a source checkout (its benchmarks/ folder is not "
                                "installed with the package); clone the repository and run 'make bench'")
    return root


def run(args) -> int:
    root = str(checkout_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("benchmarks.runner").run(args)

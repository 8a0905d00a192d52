"""convfactor bench: a pointer to ``python -m benchmarks`` (run from a source checkout; ``make bench``).

The benchmark sections live in the checkout's top-level ``benchmarks/`` folder: they need the
optional ``bench`` extras and are not part of the wheel.  This command used to find that folder
beside the package and put it on ``sys.path``; it no longer reaches outside the package.  It says,
in one line, how to run them and exits 2, the same way in a wheel and in an editable checkout:

* one behaviour everywhere, so what the tests check is what every user gets;
* the package never guesses at files beside it (a ``benchmarks/`` next to ``site-packages`` may
  belong to another distribution);
* forwarding to a second process from a checkout would hide it behind this one (the allocator
  re-run, exit codes, Ctrl-C) for a command the wheel could not honour anyway.

The options ``convfactor bench`` used to take are still accepted (and ignored), so an old command
line gets the pointer rather than a usage error.
"""
from __future__ import annotations

import argparse
import sys

HINT = ("convfactor bench: the benchmarks are not part of the installed package; from a source checkout of "
        "convfactor run `python -m benchmarks` with the same options (or `make bench` to write BENCHMARKS.md)")
HELP = "moved: run the benchmarks with `python -m benchmarks` (or `make bench`) from a source checkout"

#: the options ``convfactor bench`` took before the benchmarks moved to ``python -m benchmarks``
_OLD_OPTIONS = (("-o", "--output"), ("--quick",), ("--sections",), ("--update",), ("--experiment",), ("--threads",),
                ("--backend",), ("--list",), ("--malloc",))


def add_arguments(p: argparse.ArgumentParser) -> None:
    for flags in _OLD_OPTIONS:
        p.add_argument(*flags, nargs="*", help=argparse.SUPPRESS)


def run(args) -> int:
    print(HINT, file=sys.stderr)
    return 2

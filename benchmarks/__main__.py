"""python -m benchmarks [-o BENCHMARKS.md] [--quick] [--sections a b ...] [--update] [--experiment NAME]
[--backend B ...] [--threads N] [--malloc auto|retain|default] [--list]

Run from the checkout root (``make bench`` runs ``python -m benchmarks -o BENCHMARKS.md``).  The
benchmarks are not part of the installed package: they need the ``bench`` extras and use
convfactor's public API only.  Like the CLI's timing commands, ``--malloc auto`` (the default)
re-runs this command once with tcmalloc (else jemalloc) preloaded when one is installed; see
:mod:`convfactor.measure.allocator`.  Nothing here imports torch before that re-run.
"""
from __future__ import annotations

import argparse
import sys

from convfactor.measure.allocator import reexec_with_fast_allocator

PROG = "python -m benchmarks"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Run the benchmark sections and write BENCHMARKS.md "
                                                       "atomically (from the checkout root).")
    p.add_argument("-o", "--output", default=None, help="Markdown file to write (default: print to stdout)")
    p.add_argument("--quick", action="store_true", help="the seconds-long smoke configuration of every section")
    p.add_argument("--sections", nargs="*", default=None, help="section names to run (default: all that exist)")
    p.add_argument("--update", action="store_true",
                   help="re-run only --sections and replace them in the existing -o file, keeping the other sections")
    p.add_argument("--experiment", default=None,
                   help=f"run one of the seeds' headline experiments (see '{PROG} --list')")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every timing (default: 2)")
    p.add_argument("--backend", dest="backends", action="append", type=_backend,
                   help="timing back-end (repeatable) for the sections that take one (e.g. runtimes: plan and "
                        "time on each); without --sections, runs those sections only")
    p.add_argument("--list", action="store_true", help="list the sections and experiments, then exit")
    p.add_argument("--malloc", choices=["auto", "retain", "default"], default="auto",
                   help="CPU allocator for timing: 'auto' re-runs the command with tcmalloc (else jemalloc) "
                        "preloaded when one is installed, else 'retain'; 'retain' reuses freed activations "
                        "(mallopt); 'default' leaves glibc as it is. Recorded with every figure (default: auto)")
    return p


def _backend(text: str) -> str:
    """A registered timing back-end, ``name`` or ``name:precision=P``, checked against the registry (which
    imports torch: only when ``--backend`` is given)."""
    from convfactor.measure.backends import check_backend_name
    try:
        check_backend_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def main(argv: list[str] | None = None) -> int:
    """Parse, re-run under a fast allocator (a real command line with ``--malloc auto`` only), run the
    sections; a user's mistake (unknown section, bad ``--update``) is one line and exit status 2."""
    args = build_parser().parse_args(argv)
    if argv is None and args.malloc == "auto":
        reexec_with_fast_allocator()          # replaces this process when a fast allocator is installed
    from convfactor.utils import UnknownName

    from .runner import run
    try:
        return run(args)
    except (ValueError, UnknownName, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

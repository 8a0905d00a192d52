"""The ``convfactor`` command line: thin; every command is one library call.

Each command lives in ``convfactor/commands/NAME.py`` with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; commands whose module is absent are simply not offered.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .measure.allocator import reexec_with_fast_allocator

COMMANDS = ["inspect", "compress", "plan", "finetune", "evaluate", "demo", "report", "bench", "export", "compare"]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, ``convfactor COMMAND: error: ...`` with a
    pointer to ``--help`` (not the whole usage block), exit status 2; subcommands' parsers are of this
    class too (argparse makes them of the parent's class)."""

    def error(self, message: str):
        text = " ".join(str(message).split())          # argparse and type= messages may span lines
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    import convfactor
    parser = Parser(prog="convfactor", description="Low-rank factorization of trained PyTorch CNNs.")
    parser.add_argument("--version", action="version", version=f"convfactor {convfactor.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"convfactor.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"convfactor.commands.{name}":
                continue
            raise
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


#: the commands that time models, and so take ``--malloc`` (default ``auto``)
TIMING_COMMANDS = ("bench", "demo", "plan", "compare")


def _wants_fast_allocator(argv: list[str]) -> bool:
    """A timing command whose ``--malloc`` is ``auto`` (the default), read before torch is imported so
    the re-exec costs no second torch import; a malformed line is left to argparse."""
    if not argv or argv[0] not in TIMING_COMMANDS or any(a in ("-h", "--help") for a in argv):
        return False
    for i, a in enumerate(argv):
        if a == "--malloc":
            return argv[i + 1:i + 2] == ["auto"]
        if a.startswith("--malloc="):
            return a == "--malloc=auto"
    return True


def main(argv: list[str] | None = None) -> int:
    if argv is None and _wants_fast_allocator(sys.argv[1:]):    # a real command line, not a library call
        reexec_with_fast_allocator()
    from .utils import UnknownName
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, UnknownName, OSError) as exc:      # a user's mistake; other errors are bugs
        print(f"convfactor {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

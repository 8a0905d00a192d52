"""convfactor bench [-o BENCHMARKS.md] [--quick] [--sections a b ...] [--experiment NAME]."""
from __future__ import annotations

import sys
import time
import traceback

from .common import add_malloc_argument, apply_malloc

HELP = "run the benchmark sections (convfactor.bench) and write BENCHMARKS.md atomically"


def add_arguments(p) -> None:
    add_malloc_argument(p)
    p.add_argument("-o", "--output", default=None, help="Markdown file to write (default: print to stdout)")
    p.add_argument("--quick", action="store_true", help="the seconds-long smoke configuration of every section")
    p.add_argument("--sections", nargs="*", default=None, help="section names to run (default: all that exist)")
    p.add_argument("--experiment", default=None,
                   help="run one of the seeds' headline experiments (see 'convfactor bench --list')")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every timing (default: 2)")
    p.add_argument("--list", action="store_true", help="list the sections and experiments, then exit")


def header(quick: bool, threads: int, sections: list[str]) -> str:
    from ..measure.latency import environment
    env = environment(threads)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = ["# convfactor benchmarks", "",
             f"Written by `convfactor bench{' --quick' if quick else ''}` on {when}.", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += [f"| sections | {', '.join(sections)} |", "",
              "Speed-ups are ratios of medians measured side by side in one process, against the *fastest* dense "
              "form (contiguous or channels_last). MACs are multiply-accumulates, a count of arithmetic, not "
              "a speed. Absolute times drift between runs and machines; quote ratios.", ""]
    if quick:
        lines += ["> **Quick mode**: tiny shapes and few repeats, for smoke-testing only; these numbers mean nothing.", ""]
    return "\n".join(lines)


def run(args) -> int:
    apply_malloc(args)
    import torch

    from .. import bench
    from ..io import atomic_write, check_writable
    if args.output:
        check_writable(args.output)                     # fail before any work
    if args.list:
        print("sections:", " ".join(bench.available()))
        from ..bench import experiments
        print("experiments:", " ".join(experiments.NAMES))
        return 0
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.experiment:
            from ..bench import experiments
            if args.experiment not in experiments.NAMES:
                raise ValueError(f"unknown experiment {args.experiment!r}; known: {', '.join(experiments.NAMES)}")
            names, parts = [f"experiments:{args.experiment}"], []
            t0 = time.perf_counter()
            parts.append(experiments.run_one(args.experiment, quick=args.quick))
            parts.append(f"_({time.perf_counter() - t0:.1f} s)_\n")
            failed = []
        else:
            available = bench.available()
            names = available if args.sections is None else args.sections
            unknown = [n for n in names if n not in available]
            if unknown:
                raise ValueError(f"no such section(s): {', '.join(unknown)}; available: {', '.join(available)}")
            parts, failed = [], []
            for name in names:
                module = bench.load_section(name)
                t0 = time.perf_counter()
                print(f"[bench] {name} ...", file=sys.stderr, flush=True)
                try:
                    text = module.run(quick=args.quick)
                except Exception:  # noqa: BLE001 - one broken section must not lose the others' results
                    failed.append(name)
                    text = f"## {getattr(module, 'TITLE', name)}\n\n**This section failed:**\n\n```\n" \
                           f"{traceback.format_exc(limit=6)}```\n"
                    print(text, file=sys.stderr)
                took = time.perf_counter() - t0
                print(f"[bench] {name}: {took:.1f} s", file=sys.stderr, flush=True)
                parts.append(text.rstrip() + f"\n\n_(section `{name}`: {took:.1f} s)_\n")
                if args.output and len(parts) < len(names):   # an interrupted run keeps the finished sections
                    pending = ", ".join(names[len(parts):])
                    atomic_write(args.output, header(args.quick, args.threads, names) + "\n" + "\n".join(parts)
                                 + f"\n> **Incomplete run**: still to come: {pending}.\n")
    finally:
        torch.set_num_threads(previous)
    doc = header(args.quick, args.threads, names) + "\n" + "\n".join(parts)
    if args.output:
        atomic_write(args.output, doc)
        print(f"wrote {args.output}" + (f" ({len(failed)} section(s) failed: {', '.join(failed)})" if failed else ""))
    else:
        print(doc)
    return 1 if failed else 0

"""The benchmark runner behind ``convfactor bench`` / ``make bench``: runs sections, stamps and splices them.

Every section ends with a stamp line, ``_(section `NAME`: 12.3 s; 2026-12-01 09:00 UTC; CPU)_``, so
``--update`` can re-run some sections and splice them into an existing file, keeping the others
as they were, each with its own date and CPU.
"""
from __future__ import annotations

import re
import sys
import time
import traceback

from convfactor.commands.common import apply_malloc


#: a section's closing stamp (older files have only the seconds)
STAMP = re.compile(r"^_\(section `(?P<name>[\w:]+)`: .*\)_[ \t]*$", re.M)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def stamp(name: str, seconds: float) -> str:
    from convfactor.measure.latency import environment
    return f"_(section `{name}`: {seconds:.1f} s; {_now()}; {environment()['cpu']})_"


def split_sections(doc: str) -> dict[str, str]:
    """``name -> text`` (heading to stamp line, inclusive) of a file written by ``convfactor bench``."""
    out = {}
    first = doc.find("\n## ")
    start = first + 1 if first >= 0 else len(doc)
    for m in STAMP.finditer(doc):
        out[m.group("name")] = doc[start:m.end()].strip() + "\n"
        start = m.end() + 1
    return out


def header(quick: bool, threads: int, sections: list[str], updated: list[str] | None = None) -> str:
    from convfactor.measure.latency import environment
    env = environment(threads)
    when = _now()
    written = (f"Sections {', '.join(updated)} re-run by `convfactor bench --update` on {when}; the others are "
               "kept from earlier runs. Each section's last line gives the date and CPU it was measured on; the "
               "table below is this run's environment.") if updated else \
        f"Written by `convfactor bench{' --quick' if quick else ''}` on {when}."
    lines = ["# convfactor benchmarks", "", written, "",
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

    import benchmarks as bench
    from convfactor.io import atomic_write, check_writable
    if args.output:
        check_writable(args.output)                     # fail before any work
    kept: dict[str, str] = {}
    if args.update:
        from pathlib import Path
        if not args.output or not Path(args.output).is_file():
            raise ValueError("--update needs -o FILE naming an existing benchmarks file")
        if not args.sections:
            raise ValueError("--update needs --sections (the ones to re-run)")
        if args.experiment:
            raise ValueError("--update re-runs sections; --experiment writes a file of its own (drop one of them)")
        old = Path(args.output).read_text()
        kept = {n: _dated(t, old) for n, t in split_sections(old).items()}
        if not kept:
            raise ValueError(f"{args.output}: no section stamps found; was it written by 'convfactor bench'?")
    if args.list:
        print("sections:", " ".join(bench.available()))
        from benchmarks import experiments
        print("experiments:", " ".join(experiments.NAMES))
        return 0
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.experiment:
            from benchmarks import experiments
            if args.experiment not in experiments.NAMES:
                raise ValueError(f"unknown experiment {args.experiment!r}; known: {', '.join(experiments.NAMES)}")
            names, parts = [f"experiments:{args.experiment}"], []
            t0 = time.perf_counter()
            parts.append(experiments.run_one(args.experiment, quick=args.quick))
            parts.append(f"{stamp(names[0], time.perf_counter() - t0)}\n")
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
                parts.append(text.rstrip() + f"\n\n{stamp(name, took)}\n")
                if args.output and len(parts) < len(names):   # an interrupted run keeps the finished sections
                    pending = ", ".join(names[len(parts):])
                    if args.update:
                        atomic_write(args.output, _merged(args, kept, dict(zip(names, parts))))
                    else:
                        atomic_write(args.output, header(args.quick, args.threads, names) + "\n" + "\n".join(parts)
                                     + f"\n> **Incomplete run**: still to come: {pending}.\n")
    finally:
        torch.set_num_threads(previous)
    if args.update:
        doc = _merged(args, kept, dict(zip(names, parts)))
    else:
        doc = header(args.quick, args.threads, names) + "\n" + "\n".join(parts)
    if args.output:
        atomic_write(args.output, doc)
        print(f"wrote {args.output}" + (f" ({len(failed)} section(s) failed: {', '.join(failed)})" if failed else ""))
    else:
        print(doc)
    return 1 if failed else 0


def _dated(section: str, doc: str) -> str:
    """Give an old-style stamp (seconds only) the date and CPU of the file's header."""
    m = STAMP.search(section)
    if not m or m.group(0).count(";") >= 2:
        return section
    when = re.search(r" on (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", doc)
    cpu = re.search(r"^\| cpu \| (.*) \|$", doc, re.M)
    extra = f"; {when.group(1) if when else 'date unknown'}; {cpu.group(1) if cpu else 'CPU unknown'}"
    line = m.group(0).rstrip()
    return section[:m.start()] + line[:-2] + extra + ")_" + section[m.end():]


def _merged(args, kept: dict[str, str], new: dict[str, str]) -> str:
    """The kept sections with ``new`` ones in their place, in BENCHMARKS.md order."""
    import benchmarks as bench
    order = [n for n in bench.SECTIONS if n in kept or n in new] + [n for n in kept if n not in bench.SECTIONS]
    body = [new.get(n, kept.get(n, "")) for n in order]
    return header(args.quick, args.threads, order, updated=list(new)) + "\n" + "\n".join(b.rstrip() + "\n" for b in body)

"""The benchmark runner behind ``python -m benchmarks`` / ``make bench``: runs sections, stamps and splices them.

Every section ends with a stamp line, ``_(section `NAME`: 12.3 s; 2026-12-01 09:00 UTC; CPU)_``, so
``--update`` can re-run some sections and splice them into an existing file, keeping the others
as they were, each with its own date and CPU.
"""
from __future__ import annotations

import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import benchmarks as bench
from benchmarks import experiments
from convfactor.files import atomic_write, check_writable
from convfactor.measure.allocator import set_malloc
from convfactor.measure.latency import environment
from convfactor.utils import torch_threads

#: a section's closing stamp (older files have only the seconds)
STAMP = re.compile(r"^_\(section `(?P<name>[\w:]+)`: .*\)_[ \t]*$", re.M)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def stamp(name: str, seconds: float) -> str:
    return f"_(section `{name}`: {seconds:.1f} s; {_now()}; {environment()['cpu']})_"


def split_sections(doc: str) -> dict[str, str]:
    """``name -> text`` (heading to stamp line, inclusive) of a file written by ``python -m benchmarks``."""
    out = {}
    first = doc.find("\n## ")
    start = first + 1 if first >= 0 else len(doc)
    for m in STAMP.finditer(doc):
        out[m.group("name")] = doc[start:m.end()].strip() + "\n"
        start = m.end() + 1
    return out


def header(quick: bool, threads: int, sections: list[str], updated: list[str] | None = None) -> str:
    env = environment(threads)
    when = _now()
    written = (f"Sections {', '.join(updated)} re-run by `python -m benchmarks --update` on {when}; the others are "
               "kept from earlier runs. Each section's last line gives the date and CPU it was measured on; the "
               "table below is this run's environment.") if updated else \
        f"Written by `python -m benchmarks{' --quick' if quick else ''}` on {when}."
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


@dataclass
class Outcome:
    """What one ``python -m benchmarks`` call produced: stamped Markdown per section name."""

    parts: dict[str, str] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)


def run(args) -> int:
    """``python -m benchmarks``: write the sections (or one experiment, or ``--update`` some) to ``-o``."""
    set_malloc(args.malloc)
    if args.experiment and getattr(args, "backends", None):
        raise ValueError("--backend applies to sections; an --experiment times eager PyTorch only")
    if args.output:
        check_writable(args.output)                     # fail before any work
    kept = _kept_sections(args) if args.update else _device_sections(args)
    if args.list:
        print("sections:", " ".join(bench.available()))
        print("experiments:", " ".join(experiments.NAMES))
        return 0
    with torch_threads(args.threads):
        result = _run_experiment(args) if args.experiment else _run_sections(args, kept)
    doc = _document(args, kept, result.parts)
    if args.output:
        atomic_write(args.output, doc)
        print(f"wrote {args.output}" + (f" ({len(result.failed)} section(s) failed: {', '.join(result.failed)})"
                                        if result.failed else ""))
    else:
        print(doc)
    return 1 if result.failed else 0


def _kept_sections(args) -> dict[str, str]:
    """``--update``: the sections of the existing ``-o`` file, each stamp dated; checks the flags first."""
    if not args.output or not Path(args.output).is_file():
        raise ValueError("--update needs -o FILE naming an existing benchmarks file")
    if not args.sections:
        raise ValueError("--update needs --sections (the ones to re-run)")
    if args.experiment:
        raise ValueError("--update re-runs sections; --experiment writes a file of its own (drop one of them)")
    old = Path(args.output).read_text()
    kept = {n: _dated(t, old) for n, t in split_sections(old).items()}
    if not kept:
        raise ValueError(f"{args.output}: no section stamps found; was it written by 'python -m benchmarks'?")
    return kept


def _device_sections(args) -> dict[str, str]:
    """A full run to an existing file keeps that file's GPU sections (:data:`DEVICE_SECTIONS`), which it
    does not re-run: a machine without a GPU cannot measure them."""
    if args.sections is not None or args.experiment or not args.output or not Path(args.output).is_file():
        return {}
    old = Path(args.output).read_text()
    return {n: _dated(t, old) for n, t in split_sections(old).items() if n in bench.DEVICE_SECTIONS}


def _run_experiment(args) -> Outcome:
    """``--experiment NAME``: one of the seeds' experiments, stamped as ``experiments:NAME``."""
    if args.experiment not in experiments.NAMES:
        raise ValueError(f"unknown experiment {args.experiment!r}; known: {', '.join(experiments.NAMES)}")
    name = f"experiments:{args.experiment}"
    t0 = time.perf_counter()
    text = experiments.run_one(args.experiment, quick=args.quick)
    return Outcome(parts={name: f"{text}\n{stamp(name, time.perf_counter() - t0)}\n"})


def _run_sections(args, kept: dict[str, str]) -> Outcome:
    """Run ``--sections`` (default: all) in order; after each, an interrupted run's file is written."""
    available = bench.available()
    names = [n for n in available if n not in bench.DEVICE_SECTIONS] if args.sections is None else args.sections
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"no such section(s): {', '.join(unknown)}; available: {', '.join(available)}")
    names = _with_backends(args, names)
    result = Outcome()
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        figure_dir = Path(args.output).parent / "figures" if args.output else None
        text = _section_text(name, args.quick, result.failed, getattr(args, "backends", None), figure_dir)
        took = time.perf_counter() - t0
        print(f"[bench] {name}: {took:.1f} s", file=sys.stderr, flush=True)
        result.parts[name] = text.rstrip() + f"\n\n{stamp(name, took)}\n"
        if args.output and i + 1 < len(names):      # an interrupted run keeps the finished sections
            pending = f"\n> **Incomplete run**: still to come: {', '.join(names[i + 1:])}.\n"
            atomic_write(args.output, _document(args, kept, result.parts) + ("" if args.update else pending))
    return result


def _with_backends(args, names: list[str]) -> list[str]:
    """With ``--backend``: the sections that take back-ends (all of them by default); a named section that
    times eager PyTorch only is refused before anything runs."""
    if not getattr(args, "backends", None):
        return names
    takes = [n for n in bench.available() if bench.load_section(n).backends is not None]
    if args.sections is None:
        return takes
    eager_only = [n for n in names if n not in takes]
    if eager_only:
        raise ValueError(f"--backend applies to the section(s) {', '.join(takes)}; {', '.join(eager_only)} "
                         "time eager PyTorch only")
    return names


def _section_text(name: str, quick: bool, failed: list[str], backends: list[str] | None = None,
                  figure_dir: Path | None = None) -> str:
    """The section's Markdown (its figures written to ``figure_dir``), or, when it raises, its heading and
    the traceback (``name`` joins ``failed``)."""
    section = bench.load_section(name)
    try:
        return section.run(quick, tuple(backends) if backends else None, figure_dir)
    except Exception:  # noqa: BLE001 - one broken section must not lose the others' results
        failed.append(name)
        text = f"## {section.title}\n\n**This section failed:**\n\n```\n{traceback.format_exc(limit=6)}```\n"
        print(text, file=sys.stderr)
        return text


def _document(args, kept: dict[str, str], parts: dict[str, str]) -> str:
    """The whole file: a fresh header and ``parts``, or with ``--update`` the kept sections merged in."""
    if args.update:
        return _merged(args, kept, parts)
    parts = {**parts, **kept}                    # a full run: the kept GPU sections after the others
    return header(args.quick, args.threads, list(parts)) + "\n" + "\n".join(parts.values())


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
    order = [n for n in bench.SECTIONS if n in kept or n in new] + [n for n in kept if n not in bench.SECTIONS]
    body = [new.get(n, kept.get(n, "")) for n in order]
    return header(args.quick, args.threads, order, updated=list(new)) + "\n" + "\n".join(b.rstrip() + "\n" for b in body)

"""Markdown helpers shared by the benchmark sections' ``render`` steps."""
from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["heading", "table", "row", "noisy_mark", "NOISY_NOTE", "fastest_ms"]

#: the footnote of a table with noisy timings (marked by :func:`noisy_mark`)
NOISY_NOTE = ("† noisy: the IQR of a fastest form exceeded 25% of its median (a busy machine); re-run on a "
              "quiet machine before quoting.")


def heading(title: str) -> list[str]:
    """A section's first lines: ``## title`` and a blank line."""
    return [f"## {title}", ""]


def row(cells: Iterable) -> str:
    """``| a | b |``; an empty cell is written ``| |``."""
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def table(header: Sequence[str], rows: Iterable[Iterable] = ()) -> list[str]:
    """A header line, its ``|---|`` separator and one line per row of cells."""
    return [row(header), "|" + "---|" * len(header), *(row(cells) for cells in rows)]


def noisy_mark(noisy: bool) -> str:
    """The footnote mark after a timing that :data:`NOISY_NOTE` explains."""
    return " †" if noisy else ""


def fastest_ms(comparison, which: str) -> float:
    """Median ms of ``which`` (``"original"`` or ``"compressed"``) in its fastest form, from a
    :class:`convfactor.measure.compare.SpeedComparison`."""
    forms = getattr(comparison, which)
    return forms[getattr(comparison, f"{which}_best")]["median_ms"]

"""The contract of a benchmark section: ``measure`` the numbers, then ``render`` them as Markdown.

A section is a :class:`Section`: ``measure(quick)`` runs the experiment and returns plain data
(dataclasses, lists of dicts), ``render(data)`` writes that data as a Markdown section starting
with ``## {title}`` (tables and prose).  ``quick=True`` is the seconds-long smoke configuration the
tests use; the full run is what BENCHMARKS.md holds.  Each section module defines ``SECTION``; the
seeds' experiments (:mod:`benchmarks.experiments`) are Sections too, whose Markdown is a ``###``
subsection of the ``experiments`` section.  A section with ``backends`` set also takes
``measure(quick, backends=...)``: the timing back-ends chosen with ``python -m benchmarks --backend``.
A section with ``figures`` also draws PNGs from the same data (``data -> {name: png bytes}``); the
runner writes them to ``figures/NAME.png`` next to the Markdown file, which links them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from convfactor.files import atomic_write

__all__ = ["Section"]


@dataclass(frozen=True)
class Section:
    """One BENCHMARKS.md section: its ``name`` (as in ``--sections``), heading and two steps."""

    name: str
    title: str
    measure: Callable[..., Any]        # quick (, backends=...) -> the measured data
    render: Callable[[Any], str]       # data -> Markdown, starting with "## {title}"
    backends: tuple[str, ...] | None = None   # timing back-ends it can run on (default first); None: eager only
    figures: Callable[[Any], dict[str, bytes]] | None = None   # data -> {figure name: PNG bytes}

    def run(self, quick: bool = False, backends: tuple[str, ...] | None = None,
            figure_dir: str | Path | None = None) -> str:
        """Measure (on ``backends``, for a section that takes them), then render: the section's Markdown.
        Its figures, if any, are written to ``figure_dir/NAME.png`` (atomically) when a directory is given."""
        if backends and self.backends is None:
            raise ValueError(f"the {self.name} section times eager PyTorch only; it takes no back-ends")
        if self.backends is None:
            data = self.measure(quick)
        else:
            data = self.measure(quick, backends=tuple(backends or self.backends))
        if self.figures is not None and figure_dir is not None:
            Path(figure_dir).mkdir(parents=True, exist_ok=True)
            for name, png in self.figures(data).items():
                atomic_write(Path(figure_dir) / f"{name}.png", png)
        return self.render(data)

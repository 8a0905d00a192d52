"""The contract of a benchmark section: ``measure`` the numbers, then ``render`` them as Markdown.

A section is a :class:`Section`: ``measure(quick)`` runs the experiment and returns plain data
(dataclasses, lists of dicts), ``render(data)`` writes that data as a Markdown section starting
with ``## {title}`` (tables and prose).  ``quick=True`` is the seconds-long smoke configuration the
tests use; the full run is what BENCHMARKS.md holds.  Each section module defines ``SECTION``; the
seeds' experiments (:mod:`benchmarks.experiments`) are Sections too, whose Markdown is a ``###``
subsection of the ``experiments`` section.  A section with ``backends`` set also takes
``measure(quick, backends=...)``: the timing back-ends chosen with ``convfactor bench --backend``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Section"]


@dataclass(frozen=True)
class Section:
    """One BENCHMARKS.md section: its ``name`` (as in ``--sections``), heading and two steps."""

    name: str
    title: str
    measure: Callable[..., Any]        # quick (, backends=...) -> the measured data
    render: Callable[[Any], str]       # data -> Markdown, starting with "## {title}"
    backends: tuple[str, ...] | None = None   # timing back-ends it can run on (default first); None: eager only

    def run(self, quick: bool = False, backends: tuple[str, ...] | None = None) -> str:
        """Measure (on ``backends``, for a section that takes them), then render: the section's Markdown."""
        if backends and self.backends is None:
            raise ValueError(f"the {self.name} section times eager PyTorch only; it takes no back-ends")
        if self.backends is None:
            return self.render(self.measure(quick))
        return self.render(self.measure(quick, backends=tuple(backends or self.backends)))

"""What a plan is asked for: a typed :class:`Target`, and the :class:`SpeedupBand` a measured
speed-up must land in.

A target is parsed once, at the CLI/API edge (``Target.parse("speedup=3x")``), and validated once,
when it is built; from there on it is a kind and a number.  The band arithmetic lives here too, so
the planner and the workflow recipes share one definition of "aim" and "accepted".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .budget import parse_ratio

__all__ = ["Target", "SpeedupBand", "KINDS"]

#: target kinds: cost ratios kept (macs, params), a measured speed-up, an RMS kernel error budget,
#: the energy kept per spectrum, a fixed rank
KINDS = ("macs", "params", "speedup", "error", "energy", "rank")


@dataclass(frozen=True)
class Target:
    """One target: ``Target("speedup", 3.0)``, ``Target("macs", 0.4)``, ``Target("rank", 8)``.

    ``macs``/``params``: the fraction of the cost kept, in (0, 1]; ``speedup``: >= 1;
    ``error``/``energy``: in (0, 1]; ``rank``: an int >= 1.
    """

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown target {self.kind!r} (known: {', '.join(KINDS)})")
        if self.kind == "rank":
            if isinstance(self.value, bool) or int(self.value) != self.value or self.value < 1:
                raise ValueError(f"rank must be an int >= 1, got {self.value!r}")
            object.__setattr__(self, "value", int(self.value))
            return
        value = float(self.value)
        if self.kind == "speedup" and not (value >= 1 and math.isfinite(value)):
            raise ValueError(f"speedup must be >= 1, got {self.value!r}")
        if self.kind != "speedup" and not 0 < value <= 1:
            raise ValueError(f"{self.kind} must be in (0, 1], got {self.value!r}")
        object.__setattr__(self, "value", value)

    @classmethod
    def parse(cls, target) -> "Target | None":
        """``'macs=40%'``, ``'params=3x'``, ``'speedup=3x'``, ``'error=0.2'``, ``'energy=0.9'``,
        ``'rank=8'``, a one-item dict (``{'speedup': 3}``), a Target, or None."""
        if target is None or isinstance(target, Target):
            return target
        if isinstance(target, dict):
            if len(target) != 1:
                raise ValueError(f"a target is one key, e.g. {{'speedup': 3}}, got {target!r}")
            (kind, value), = target.items()
        else:
            text = str(target).strip()
            if "=" not in text:
                raise ValueError(f"a target looks like macs=40%, params=25%, speedup=3x or error=0.2, got {target!r}")
            kind, value = (t.strip() for t in text.split("=", 1))
        kind = str(kind).lower()
        return cls(kind, _number(kind, value))

    def as_dict(self) -> dict[str, float]:
        """``{kind: value}``, as a plan file records it."""
        return {self.kind: self.value}


def _number(kind: str, value) -> float:
    """The number in ``value`` for a target of ``kind`` ('40%' and '3x' are ratios for macs/params)."""
    if kind in ("macs", "params"):
        return parse_ratio(value)
    try:
        if kind == "speedup":
            return float(str(value).lower().rstrip("x"))
        if kind == "rank":
            return int(value)
        return float(value)
    except ValueError:
        hint = "look like 3x" if kind == "speedup" else "be a number"
        raise ValueError(f"{kind} must {hint}, got {value!r}") from None


@dataclass(frozen=True)
class SpeedupBand:
    """The measured speed-ups a latency plan is accepted at, for a request of ``request`` x.

    ``aim`` is what the planner aims its per-layer model at; ``low``/``high`` bound the accepted
    end-to-end measurements.
    """

    request: float
    aim: float
    low: float
    high: float

    @classmethod
    def around(cls, request: float, band: float) -> "SpeedupBand":
        """Aim at the request, accept ``request * [1 - band, 1 + band]``."""
        request = Target("speedup", request).value
        if not 0 <= band < 1:
            raise ValueError(f"band must be in [0, 1), got {band:g}")
        return cls(request, request, request * (1 - band), request * (1 + band))

    @classmethod
    def at_least(cls, request: float, margin: float) -> "SpeedupBand":
        """For a plan that must measure *at least* ``request`` again later (after fine-tuning).

        End-to-end timings on a shared CPU vary by a few per cent between runs, so the accepted band
        starts half a margin above the request: aim ``request * (1 + m)``, accept
        ``request * [1 + m/2, 1 + 3m/2]``; the lower edge is never below the request.
        """
        request = Target("speedup", request).value
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"plan margin must be in [0, 1), got {margin:g}")
        return cls(request, request * (1 + margin), request * (1 + margin / 2), request * (1 + 1.5 * margin))

    def __contains__(self, measured: float) -> bool:
        return self.low <= measured <= self.high
